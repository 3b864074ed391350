"""Inference: a KV cache outside the model, sampling, a batched generation engine, and continuous batching
over per-slot caches for the server (lazy imports)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GenerationConfig": "lmforge.generate.engine",
    "generate": "lmforge.generate.engine",
    "generate_ids": "lmforge.generate.engine",
    "KVCache": "lmforge.generate.kv_cache",
    "SlotKVCache": "lmforge.generate.kv_cache",
    "ContinuousBatcher": "lmforge.generate.batcher",
    "SamplingParams": "lmforge.generate.batcher",
    "TextStream": "lmforge.generate.text_stream",
    "filter_logits": "lmforge.generate.sampling",
    "sample_next": "lmforge.generate.sampling",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.generate' has no attribute '{name}'")
