"""Token-shard dirs: ``index.json`` + raw ``train_*.bin`` / ``val_*.bin`` (uint16, or uint32 above 65,536 ids).

``index.json`` (written last by ``prepare``; format version 1)::

    {"format": "lmforge-token-shards", "version": 1,
     "tokenizer": {"hash": "sha256:…", "vocab_size": 8192, "eos_id": 2, "bos_id": 1, "pad_id": 0, "path": "…"},
     "tokenizer_hash": "sha256:…", "vocab_size": 8192, "dtype": "uint16", "eos_id": 2,
     "splits": {"train": {"tokens": N, "documents": D,
                          "shards": [{"file": "train_00000.bin", "tokens": n, "documents": d, "sha256": "…"}]},
                "val": {…}},
     "cleaning": {…the prepare report…}, "config": {…prepare arguments…}}

Documents are stored back to back, each followed by the EOS id (and preceded by BOS when prepared with
``add_bos``). A document may continue from one shard into the next; readers see one stream per split.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import UserError, read_json_bounded
from lmforge.data.remote import (
    check_remote_shards,
    is_remote,
    parse_index_bytes,
    read_remote_index_bytes,
    sha256_file,
)
from lmforge.tokenizer.identity import tokenizer_hash

INDEX_NAME = "index.json"
FORMAT = "lmforge-token-shards"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "uint32"


def read_index(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check ``index.json`` (of a local dir or an ``s3://``/``gs://`` prefix); every
    problem is a one-line UserError."""
    if is_remote(shard_dir):
        where = f"{str(shard_dir).rstrip('/')}/{INDEX_NAME}"
        return check_index(parse_index_bytes(read_remote_index_bytes(str(shard_dir)), where), where)
    d = Path(shard_dir)
    p = d / INDEX_NAME
    if not d.is_dir():
        raise UserError(f"token-shard dir '{shard_dir}' does not exist; run `lmforge prepare --out {shard_dir}` first")
    if not p.is_file():
        raise UserError(f"'{shard_dir}' is not a token-shard dir ({INDEX_NAME} is missing); "
                        f"run `lmforge prepare --out {shard_dir}`")

    try:
        index = read_json_bounded(p, what="token-shard index")
    except UserError as e:
        raise UserError(f"{e}; re-run `lmforge prepare`") from None
    return check_index(index, p)


def check_index(index: Any, p: str | os.PathLike) -> dict[str, Any]:
    """The format checks every reader relies on; ``p`` names the index in errors."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{p} is not an lmforge token-shard index (format != {FORMAT!r}); re-run `lmforge prepare`")
    if index.get("dtype") not in DTYPES:
        raise UserError(f"{p}: dtype {index.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(index.get("splits"), dict):
        raise UserError(f"{p} has no 'splits'; re-run `lmforge prepare`")
    _check_index_types(p, index)
    return index


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_index_types(p: str | os.PathLike, index: dict[str, Any]) -> None:
    """Every count an integer, every shard a plain file name: a mistyped index is a one-line error."""
    for key in ("vocab_size", "eos_id"):
        if key in index and index[key] is not None and not _is_count(index[key]):
            raise UserError(f"{p}: '{key}' is {index[key]!r}, not a non-negative integer; re-run `lmforge prepare`")
    for split, entry in index["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or ("tokens" in entry and not _is_count(entry["tokens"])):
            raise UserError(f"{p}: split '{split}' is malformed (needs integer 'tokens' and a 'shards' list); "
                            "re-run `lmforge prepare`")
        for i, shard in enumerate(shards):
            ok = isinstance(shard, dict) and _is_count(shard.get("tokens")) and isinstance(shard.get("file"), str) \
                and "/" not in shard["file"] and "\\" not in shard["file"] and shard["file"] not in ("", ".", "..")
            if not ok:
                raise UserError(f"{p}: shard {i} of split '{split}' is malformed (needs a plain 'file' name and "
                                "integer 'tokens'); re-run `lmforge prepare`")


def check_shards(shard_dir: str | os.PathLike, index: dict[str, Any], split: str, verify: bool = False) -> None:
    """Each shard of ``split`` exists with the size its token count implies (and the recorded sha256)."""
    if is_remote(shard_dir):
        check_remote_shards(str(shard_dir), index, split, verify)
        return
    d = Path(shard_dir)
    itemsize = np.dtype(DTYPES[index["dtype"]]).itemsize
    for shard in index["splits"].get(split, {}).get("shards", []):
        path = d / shard["file"]
        if not path.is_file():
            raise UserError(f"shard {path} listed in {INDEX_NAME} is missing; re-run `lmforge prepare`")
        expected = int(shard["tokens"]) * itemsize
        size = path.stat().st_size
        if size != expected:
            what = "truncated" if size < expected else "longer than recorded"
            raise UserError(f"shard {path} is {what} ({size:,} bytes, index says {expected:,}); "
                            "re-run `lmforge prepare`")
        if verify and sha256_file(path) != shard.get("sha256"):
            raise UserError(f"shard {path} is corrupt (sha256 differs from {INDEX_NAME}); re-run `lmforge prepare`")


def verify_shards(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Full check of every split including checksums; returns the index."""
    index = read_index(shard_dir)
    for split in index["splits"]:
        check_shards(shard_dir, index, split, verify=True)
    return index


class TokenStream:
    """The concatenated tokens of one split, memory-mapped; ``read(start, n)`` crosses shard borders."""

    def __init__(self, shard_dir: str | os.PathLike, index: dict[str, Any], split: str,
                 fetch: Callable[[str], Path] | None = None, name: str | None = None):
        self.dir = Path(shard_dir)
        self.fetch = fetch  # remote shards: file name -> local cached path (lmforge/data/remote.py)
        self.name = name or str(shard_dir)
        self.split = split
        self.dtype = DTYPES[index["dtype"]]
        shards = index["splits"].get(split, {}).get("shards", [])
        self.files = [s["file"] for s in shards if int(s["tokens"]) > 0]
        counts = [int(s["tokens"]) for s in shards if int(s["tokens"]) > 0]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.maps: list[np.memmap | None] = [None] * len(self.files)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _map(self, i: int) -> np.ndarray:
        m = self.maps[i]
        if m is None:
            path = self.fetch(self.files[i]) if self.fetch is not None else self.dir / self.files[i]
            m = self.maps[i] = np.memmap(path, dtype=self.dtype, mode="r")
        return m

    def shard_of(self, pos: int) -> str:
        i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        return f"{self.name.rstrip('/')}/{self.files[min(max(i, 0), len(self.files) - 1)]}"

    def files_for(self, starts: np.ndarray, n: int) -> list[str]:
        """Shard files holding the tokens [s, s + n) for every s in ``starts``."""
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, starts + n - 1, side="right") - 1
        return [self.files[i] for i in sorted({int(j) for a, b in zip(first, last) for j in range(a, b + 1)})]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64."""
        out = np.empty(n, dtype=np.int64)
        pos, filled = start, 0
        i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
        while filled < n:
            m = self._map(i)
            lo = pos - int(self.offsets[i])
            take = min(n - filled, len(m) - lo)
            out[filled:filled + take] = m[lo:lo + take]
            filled += take
            pos += take
            i += 1
        return out


def check_shards_tokenizer(shard_dir: str | os.PathLike, tokenizer_dir: str | None,
                           index: dict[str, Any] | None = None) -> str | None:
    """The tokenizer dir a pretraining run will ship (``data.tokenizer``, else the one ``index.json`` names)
    has the hash the shards were prepared with. Returns that dir (None when there is none to check)."""
    if index is None:
        index = read_index(shard_dir)
    expected = index.get("tokenizer_hash")
    path = tokenizer_dir or (index.get("tokenizer") or {}).get("path")
    if not expected or not path or not Path(path).exists():
        return None  # pretrain itself reports a missing data.tokenizer / recorded dir
    found = tokenizer_hash(path)
    if found != expected:
        raise UserError(f"tokenizer '{path}' (hash {found}) is not the one the shards in '{shard_dir}' were "
                        f"prepared with ({expected}); set data.tokenizer to the right dir or re-run "
                        "`lmforge prepare` with this tokenizer")
    return path
