"""Data: ``prepare`` (text -> token shards), shards (index + memmap reader), ``ShardLoader`` (resumable).

Imported lazily: ``import lmforge.data`` costs nothing until a name is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare": "lmforge.data.prepare",
    "ShardLoader": "lmforge.data.loader",
    "document_mask": "lmforge.data.loader",
    "document_positions": "lmforge.data.loader",
    "read_index": "lmforge.data.shards",
    "verify_shards": "lmforge.data.shards",
    "iter_documents": "lmforge.data.sources",
    "resolve_inputs": "lmforge.data.sources",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.data' has no attribute '{name}'")
