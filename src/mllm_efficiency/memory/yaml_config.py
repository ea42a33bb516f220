"""YAML configs of the QuickLlama / InfLLM kind (docs/long_context_memory.md), validated.

    cfg = load_memory_config("configs/memory/llama3-qllm-2k.yaml")
    me.apply(model, cfg.method, **cfg.kwargs)      # or patch_hf(model, cfg.type, cfg.model)

Unknown keys raise naming the key and the allowed ones; values are checked by the method's config dataclass.
OmegaConf reads the file when installed (interpolations work); PyYAML otherwise.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from .config import MemoryConfig
from .search import method_kwargs_from_model_section, method_of_type

TOP_LEVEL = {"model": None, "max_len": 2147483647, "truncation": "none", "chunk_size": 8192, "conv_type": None,
             "max_new_tokens": 128}
MODEL_ONLY = {"type", "path", "tokenizer_path", "fattn", "faiss"}
MODEL_KEYS = MODEL_ONLY | {f.name for f in dataclasses.fields(MemoryConfig)}
CONV_TYPES = ("llama-3-inst", "mistral-inst", "qwen", "minicpm", "vicuna")
TRUNCATIONS = ("none", "suffix")


@dataclasses.dataclass(frozen=True)
class MemoryYAML:
    type: str
    method: str | None  # registered method name; None for `origin` (dense)
    kwargs: dict  # keyword arguments of the method
    model: dict  # the raw `model:` section
    path: str | None = None
    tokenizer_path: str | None = None
    max_len: int = 2147483647
    truncation: str = "none"
    chunk_size: int = 8192
    conv_type: str | None = None
    max_new_tokens: int = 128
    source: str | None = None

    @property
    def method_config(self):
        if self.method is None:
            return None
        from ..registry import get_method

        spec = get_method(self.method)
        return spec.config_cls.from_kwargs(self.method, **self.kwargs)

    @property
    def stem(self) -> str:
        return Path(self.source).stem if self.source else "config"


def _read(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"yaml: config file {str(p)!r} does not exist")
    text = read_text_file(p, "yaml")  # a binary file: named, not a UnicodeDecodeError
    try:
        from omegaconf import OmegaConf
    except ImportError:
        OmegaConf = None
    try:
        if OmegaConf is not None:
            data = OmegaConf.to_container(OmegaConf.load(str(p)), resolve=True)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # a syntax error (either parser): name the file
        detail = " ".join(str(exc).split())
        raise ConfigError(f"yaml: cannot parse {str(p)!r}: {detail}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"yaml: {str(p)!r} must hold a mapping with a `model:` section")
    return data


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of `path`; `ConfigError` naming `what` and the file when it is binary or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {str(path)!r} is not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None


def load_memory_config(source: str | os.PathLike | Mapping, **overrides: Any) -> MemoryYAML:
    """Read and validate a memory YAML (path or mapping). `overrides` replace `model.<key>` entries."""
    data = _plain(source) if isinstance(source, Mapping) or hasattr(source, "keys") else _read(source)
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ConfigError(f"yaml: unknown top-level key(s) {unknown}; allowed: {sorted(TOP_LEVEL)}")
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ConfigError("yaml: a `model:` section (mapping) is required")
    model = dict(model)
    model.update(overrides)
    bad = sorted(set(model) - MODEL_KEYS)
    if bad:
        raise ConfigError(f"yaml: unknown key(s) {['model.' + k for k in bad]}; allowed: "
                          f"{sorted('model.' + k for k in MODEL_KEYS)}")
    if "type" not in model:
        raise ConfigError(f"yaml: model.type is required; allowed: {sorted(_types())}")
    method = method_of_type(model["type"])
    kwargs = method_kwargs_from_model_section(model)
    out = MemoryYAML(type=str(model["type"]), method=method, kwargs=kwargs, model=model, path=model.get("path"),
                     tokenizer_path=model.get("tokenizer_path"),
                     max_len=data.get("max_len", TOP_LEVEL["max_len"]),
                     truncation=str(data.get("truncation", "none") or "none"),
                     chunk_size=data.get("chunk_size", TOP_LEVEL["chunk_size"]),
                     conv_type=data.get("conv_type"), max_new_tokens=data.get("max_new_tokens", 128),
                     source=None if isinstance(source, Mapping) else str(source))
    _validate(out)
    return out


def _types():
    from .search import METHOD_OF_TYPE

    return METHOD_OF_TYPE


def _plain(obj) -> dict:
    from .search import _plain as plain

    return plain(obj)


def _validate(cfg: MemoryYAML) -> None:
    from ..config import check_choice, check_int

    check_int("max_len", cfg.max_len, 1)
    check_int("chunk_size", cfg.chunk_size, 1)
    check_int("max_new_tokens", cfg.max_new_tokens, 0)
    check_choice("truncation", cfg.truncation, TRUNCATIONS)
    if cfg.conv_type is not None:
        check_choice("conv_type", cfg.conv_type, CONV_TYPES)
    mc = cfg.method_config  # validates every value (names the field and its range)
    if mc is not None and cfg.chunk_size < mc.exc_block_size:
        raise ConfigError(f"chunk_size must be >= model.exc_block_size ({mc.exc_block_size}), got {cfg.chunk_size}")
