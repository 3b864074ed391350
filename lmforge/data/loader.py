"""Resumable, rank-aware sampling of (batch, seq_len + 1) windows from a token-shard dir.

The split's tokens form one stream cut into ``W = (N - 1) // seq_len`` windows; window ``w`` holds
tokens ``[w·seq_len, w·seq_len + seq_len + 1)`` so that inputs ``[:, :-1]`` and targets ``[:, 1:]``
cover every token once. The *global sample stream* is epoch 0's permutation of the windows, then
epoch 1's, …; the permutation is a keyed bijection of (seed, epoch) computed on the fly (a Feistel
network with cycle walking), so it needs no memory however many windows there are.

Global batch ``k`` is samples ``[k·B, (k+1)·B)`` of that stream and rank ``r`` of ``R`` takes the ``r``-th
``B/R`` of it. The state is just the number of samples consumed, so a run saved on 4 ranks resumes on 1,
2 or 8 (even with another global batch) with no sample repeated and none skipped.

With ``doc_mask=True``, ``next_batch()`` returns ``(tokens, doc_ids)``: ``doc_ids[b, t]`` counts the EOS
tokens before position ``t`` in the window, so two positions belong to the same document iff their
ids are equal (the EOS closing a document belongs to it). :func:`document_mask` turns them into the
model's boolean attention mask and :func:`document_positions` into positions that restart at 0 in each
document.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.config import UserError
from lmforge.data.remote import RemoteShards, is_remote, parse_index_bytes, read_remote_index_bytes
from lmforge.data.shards import TokenStream, check_index, check_shards, read_index

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64-style round function over uint64 arrays."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(key & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A pseudo-random bijection of ``[0, n)`` keyed by ``(seed, epoch)``; ``perm(i)`` for arrays of i."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("n must be positive")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        base = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch]).generate_state(
            self.ROUNDS * 2, dtype=np.uint32)
        self.keys = [int(base[2 * i]) << 32 | int(base[2 * i + 1]) for i in range(self.ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        out = self._once(x)
        bad = out >= np.uint64(self.n)
        while bad.any():  # cycle walking: the domain is < 4n, so this ends after a few rounds
            out[bad] = self._once(out[bad])
            bad = out >= np.uint64(self.n)
        return out.astype(np.int64)


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) -> (B, T) document index of each position within its row (EOS ends a document)."""
    is_eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> bool (B, 1, T, T) mask, True where query and key are in the same document
    (the model adds causality)."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> (B, T) positions restarting at 0 at every document start."""
    b, t = doc_ids.shape
    ar = torch.arange(t, device=doc_ids.device).expand(b, t)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(start, ar, torch.zeros_like(ar))
    first = torch.cummax(first, dim=1).values
    return ar - first


class ShardLoader:
    """Memory-mapped token shards -> (global_batch // world_size, seq_len + 1) LongTensor batches.

    Checks on open (each a one-line :class:`UserError` naming the shard or the key): ``index.json``
    present and valid, shards present with the recorded sizes (``verify=True`` also checks sha256),
    ``tokenizer_hash`` equal to the index's, the index's vocab size ≤ ``check_vocab``; and on every batch,
    no token id ≥ ``check_vocab``.
    """

    def __init__(self, shard_dir: str | os.PathLike, split: str = "train", seq_len: int = 512,
                 global_batch: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0,
                 check_vocab: int | None = None, tokenizer_hash: str | None = None, doc_mask: bool = False,
                 verify: bool = False, cache_dir: str | os.PathLike | None = None):
        if seq_len < 1:
            raise UserError(f"seq_len={seq_len} must be positive")
        if global_batch < 1:
            raise UserError(f"global_batch={global_batch} must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank={rank} is not in [0, world_size={world_size})")
        if global_batch % world_size:
            raise UserError(f"global_batch={global_batch} is not divisible by world_size={world_size}; "
                            f"try {((global_batch + world_size - 1) // world_size) * world_size}")
        self.remote = None  # RemoteShards when shard_dir is an s3:// / gs:// URL (lmforge/data/remote.py)
        self.cache_dir = cache_dir
        if is_remote(shard_dir):
            self.shard_dir: str | Path = str(shard_dir)
            raw = read_remote_index_bytes(str(shard_dir))
            where = f"{str(shard_dir).rstrip('/')}/index.json"
            self.index: dict[str, Any] = check_index(parse_index_bytes(raw, where), where)
            self.remote = RemoteShards(str(shard_dir), self.index, raw, cache_dir)
        else:
            self.shard_dir = Path(shard_dir)
            self.index = read_index(shard_dir)
        if split not in self.index["splits"] or not self.index["splits"][split].get("tokens"):
            have = [s for s, v in self.index["splits"].items() if v.get("tokens")]
            hint = " (prepare with --val-fraction > 0 for a val split)" if split == "val" else ""
            raise UserError(f"'{shard_dir}' has no '{split}' split{hint}; it has: {', '.join(have) or 'none'}")
        if tokenizer_hash is not None and tokenizer_hash != self.index.get("tokenizer_hash"):
            raise UserError(f"'{shard_dir}' was prepared with tokenizer {self.index.get('tokenizer_hash')}, "
                            f"not {tokenizer_hash}; re-run `lmforge prepare` with this tokenizer")
        vocab = int(self.index.get("vocab_size", 0))
        if check_vocab is not None and vocab > check_vocab:
            raise UserError(f"'{shard_dir}' was prepared with a {vocab:,}-token vocabulary but the model has "
                            f"{check_vocab:,} embeddings; set model vocab_size >= {vocab}")
        if self.remote is not None:
            self.remote.check(split)  # sizes from one listing; each shard's sha256 is checked when fetched
        else:
            check_shards(shard_dir, self.index, split, verify=verify)
        self.split, self.seq_len, self.global_batch = split, seq_len, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.check_vocab, self.doc_mask = check_vocab, doc_mask
        self.eos_id = self.index.get("eos_id")
        self.stream = TokenStream(self.remote.dir, self.index, split, self.remote.fetch, str(shard_dir)) \
            if self.remote is not None else TokenStream(shard_dir, self.index, split)
        self.num_tokens = len(self.stream)
        self.num_windows = (self.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"the '{split}' split of '{shard_dir}' has {self.num_tokens:,} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; lower seq_len or prepare more text")
        self.samples_seen = 0  # global samples consumed, all ranks together
        self._perms: dict[int, FeistelPermutation] = {}

    # --- the global stream ------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.samples_seen // self.num_windows

    def _perm(self, epoch: int) -> FeistelPermutation:
        if epoch not in self._perms:
            self._perms = {epoch: FeistelPermutation(self.num_windows, self.seed, epoch)}
        return self._perms[epoch]

    def global_windows(self, start: int, count: int) -> np.ndarray:
        """Window indices of global samples ``[start, start + count)`` (they may cross epochs)."""
        out = np.empty(count, dtype=np.int64)
        pos = 0
        while pos < count:
            s = start + pos
            epoch, within = divmod(s, self.num_windows)
            take = min(count - pos, self.num_windows - within)
            out[pos:pos + take] = self._perm(epoch)(np.arange(within, within + take, dtype=np.uint64))
            pos += take
        return out

    def _read_windows(self, windows: np.ndarray) -> torch.Tensor:
        if self.remote is not None and len(windows):  # fetch the batch's uncached shards in parallel
            self.remote.fetch_many(self.stream.files_for(np.asarray(windows) * self.seq_len, self.seq_len + 1))
        rows = np.stack([self.stream.read(int(w) * self.seq_len, self.seq_len + 1) for w in windows])
        if self.check_vocab is not None and rows.size:
            bad = rows >= self.check_vocab
            if bad.any():
                r, c = map(int, np.argwhere(bad)[0])
                pos = int(windows[r]) * self.seq_len + c
                raise UserError(f"shard {self.stream.shard_of(pos)} holds token id {int(rows[r, c])} >= the "
                                f"model's vocab size {self.check_vocab}; re-run `lmforge prepare` with the "
                                "model's tokenizer or enlarge the model's vocab")
        return torch.from_numpy(rows)

    def _with_docs(self, batch: torch.Tensor):
        if not self.doc_mask:
            return batch
        return batch, document_ids(batch, int(self.eos_id))

    def next_batch(self):
        """This rank's slice of the next global batch: LongTensor (global_batch // world_size, seq_len + 1);
        with ``doc_mask`` a tuple ``(tokens, doc_ids)``."""
        per_rank = self.global_batch // self.world_size
        start = self.samples_seen + self.rank * per_rank
        batch = self._read_windows(self.global_windows(start, per_rank))
        self.samples_seen += self.global_batch
        return self._with_docs(batch)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- evaluation --------------------------------------------------------------------------------
    def eval_batches(self, n_batches: int, batch_size: int, split: str | None = None) -> Iterator:
        """``n_batches`` batches of ``(batch_size, seq_len + 1)`` windows from the val split (or ``split``),
        spread evenly over it, in order: the same every call and on every rank. Windows repeat only
        when the split has fewer than ``n_batches × batch_size`` of them."""
        split = split or "val"
        src = self if split == self.split else ShardLoader(
            self.shard_dir, split, self.seq_len, 1, 0, 1, self.seed, self.check_vocab,
            None, self.doc_mask, cache_dir=self.cache_dir)
        total = n_batches * batch_size
        if total <= 0:
            return iter(())
        windows = (np.arange(total, dtype=np.int64) * src.num_windows) // total \
            if total <= src.num_windows else np.arange(total, dtype=np.int64) % src.num_windows

        def gen():
            for i in range(n_batches):
                yield src._with_docs(src._read_windows(windows[i * batch_size:(i + 1) * batch_size]))

        return gen()

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"samples_seen": self.samples_seen, "epoch": self.epoch, "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split, "num_windows": self.num_windows,
                "num_tokens": self.num_tokens, "tokenizer_hash": self.index.get("tokenizer_hash")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "mixture":
            raise UserError("loader state was saved by a data.sources mixture, not a single data.dir; resume with "
                            "the same data settings")
        for key in ("seed", "seq_len", "num_tokens", "tokenizer_hash"):
            if key in state and state[key] != getattr(self, key, self.index.get(key)):
                raise UserError(f"loader state was saved with {key}={state[key]!r} but this loader has "
                                f"{getattr(self, key, self.index.get(key))!r}; resume on the same data and "
                                "settings")
        self.samples_seen = int(state["samples_seen"])
