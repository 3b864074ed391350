"""Identity checks: the tokenizer a run or a model dir uses is the one its data/weights were made with.

Token ids mean nothing without the exact vocabulary, and a wrong tokenizer fails silently (the model
trains or generates, on garbage). So every command checks, before any work:

* ``pretrain``: the data's tokenizer dir against the hash in the shards' ``index.json`` — every run,
  whether or not it has a validation split (:func:`check_shards_tokenizer`);
* commands that load a model dir: its tokenizer files against the ``tokenizer_hash`` in its metadata
  (``lmforge.artifacts.identity.check_model_dir_tokenizer``; dirs without a recorded hash are not checked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.config import UserError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _hash_of(tokenizer_dir: str | os.PathLike) -> str:
    from lmforge.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir).hash


def tokenizer_dir_hash(directory: str | os.PathLike) -> str | None:
    """The hash of the tokenizer files in ``directory`` (what ``config.json``'s ``tokenizer_hash`` records),
    or None when the dir holds none."""
    d = Path(directory)
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return _hash_of(d)


def check_shards_tokenizer(shard_dir: str | os.PathLike, tokenizer_dir: str | None,
                           index: dict[str, Any] | None = None) -> str | None:
    """The tokenizer dir a pretraining run will ship (``data.tokenizer``, else the one ``index.json`` names)
    has the hash the shards were prepared with. Returns that dir (None when there is none to check)."""
    if index is None:
        from lmforge.data.shards import read_index

        index = read_index(shard_dir)
    expected = index.get("tokenizer_hash")
    path = tokenizer_dir or (index.get("tokenizer") or {}).get("path")
    if not expected or not path or not Path(path).exists():
        return None  # pretrain itself reports a missing data.tokenizer / recorded dir
    found = _hash_of(path)
    if found != expected:
        raise UserError(f"tokenizer '{path}' (hash {found}) is not the one the shards in '{shard_dir}' were "
                        f"prepared with ({expected}); set data.tokenizer to the right dir or re-run "
                        "`lmforge prepare` with this tokenizer")
    return path
