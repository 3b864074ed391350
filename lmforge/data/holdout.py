"""Hold out validation tokens when there are too few documents to hold out whole ones.

`prepare --val-fraction F` puts each document in val with probability F (by a hash of its text). A corpus
of one document (Tiny Shakespeare as one file) or a handful gets no val document, or only val ones. Then
the tail of the token stream becomes the val split instead: the last ``F`` of the tokens, cut from the end
of the train shards (the document cut there ends in train without its EOS and continues in val).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

VAL_FILE = "val_00000.bin"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _all_in_train(directory: Path, splits: dict[str, Any]) -> None:
    """Rename every val shard to a train shard (after the train ones), leaving val empty."""
    train, val = splits["train"], splits["val"]
    for shard in val["shards"]:
        name = f"train_{len(train['shards']):05d}.bin"
        (directory / shard["file"]).rename(directory / name)
        train["shards"].append({**shard, "file": name})
    train["tokens"] += val["tokens"]
    train["documents"] += val["documents"]
    splits["val"] = {"tokens": 0, "documents": 0, "shards": []}


def hold_out_tail(directory: str | Path, splits: dict[str, Any], fraction: float, dtype: str,
                  eos_id: int) -> int:
    """Make the last ``fraction`` of all tokens the val split (``splits`` is updated in place, shard files
    rewritten). Returns the number of tokens held out (0 when the corpus is too small to split)."""
    directory = Path(directory)
    _all_in_train(directory, splits)
    train = splits["train"]
    total = train["tokens"]
    k = int(round(total * fraction))
    if k < 1 or k >= total:
        return 0
    item = np.dtype(dtype).itemsize
    parts: list[np.ndarray] = []
    need = k
    while need:
        shard = train["shards"][-1]
        path = directory / shard["file"]
        tokens = np.fromfile(path, dtype=dtype)
        take = min(need, len(tokens))
        tail = tokens[len(tokens) - take:]
        docs = int((tail == eos_id).sum())  # documents that now end in val
        parts.insert(0, tail.copy())
        if take == len(tokens):
            path.unlink()
            train["shards"].pop()
        else:
            with open(path, "r+b") as f:
                f.truncate((len(tokens) - take) * item)
            shard.update(tokens=len(tokens) - take, documents=shard["documents"] - docs, sha256=_sha256(path))
        train["tokens"] -= take
        train["documents"] -= docs
        need -= take
    held = np.concatenate(parts)
    held.tofile(directory / VAL_FILE)
    docs = int((held == eos_id).sum())
    splits["val"] = {"tokens": int(len(held)), "documents": docs,
                     "shards": [{"file": VAL_FILE, "tokens": int(len(held)), "documents": docs,
                                 "sha256": _sha256(directory / VAL_FILE)}]}
    return k
