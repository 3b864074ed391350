"""Inference: a KV cache outside the model, sampling, and a batched generation engine (lazy imports)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GenerationConfig": "lmforge.generate.engine",
    "generate": "lmforge.generate.engine",
    "generate_ids": "lmforge.generate.engine",
    "KVCache": "lmforge.generate.kv_cache",
    "filter_logits": "lmforge.generate.sampling",
    "sample_next": "lmforge.generate.sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.generate' has no attribute '{name}'")
