"""Tokenizers: train a byte-level BPE (``train_tokenizer``), load ``tokenizer.json`` / SentencePiece
(``load_tokenizer``), one small interface (``Tokenizer``). Imported lazily: nothing heavy at import time."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Tokenizer": "lmforge.tokenizer.core",
    "HFTokenizer": "lmforge.tokenizer.core",
    "SentencePieceTokenizer": "lmforge.tokenizer.core",
    "load_tokenizer": "lmforge.tokenizer.core",
    "SPECIAL_TOKENS": "lmforge.tokenizer.core",
    "DEFAULT_CHAT_TEMPLATE": "lmforge.tokenizer.core",
    "train_tokenizer": "lmforge.tokenizer.train",
    "evaluate_tokenizer": "lmforge.tokenizer.evaluate",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.tokenizer' has no attribute '{name}'")
