"""Identity checks: the tokenizer a run or a model dir uses is the one its data/weights were made with.

Token ids mean nothing without the exact vocabulary, and a wrong tokenizer fails silently (the model
trains or generates, on garbage). So every command checks, before any work:

* ``pretrain``: the data's tokenizer dir against the hash in the shards' ``index.json`` — every run,
  whether or not it has a validation split (:func:`lmforge.data.shards.check_shards_tokenizer`);
* commands that load a model dir: its tokenizer files against the ``tokenizer_hash`` in its metadata
  (``lmforge.artifacts.identity.check_model_dir_tokenizer``; dirs without a recorded hash are not checked).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.tokenizer.core import load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """The hash of the tokenizer in ``tokenizer_dir`` (a one-line UserError when it holds none)."""
    return load_tokenizer(tokenizer_dir).hash


def tokenizer_dir_hash(directory: str | os.PathLike) -> str | None:
    """The hash of the tokenizer files in ``directory`` (what ``config.json``'s ``tokenizer_hash`` records),
    or None when the dir holds none."""
    d = Path(directory)
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return tokenizer_hash(d)
