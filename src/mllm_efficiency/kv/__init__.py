"""KV-cache compression (docs/kv_methods.md): score -> select -> store, at prefill and during decoding.

Importing this package registers the methods: streamingllm, h2o, snapkv, pyramidkv, adakv, l2norm, random,
vlcache, lookm, tova, keydiff, expected_attention.
"""
from . import (  # noqa: F401
    adakv, expected_attention, h2o, keydiff, l2norm, lookm, pyramidkv, randomkv, snapkv, streamingllm, tova, vlcache,
)
from .base import KVConfig, KVStats, LayerInput, Policy, Selection, kept_positions
from .method import kv_method

__all__ = ["KVConfig", "KVStats", "LayerInput", "Policy", "Selection", "kept_positions", "kv_method"]
