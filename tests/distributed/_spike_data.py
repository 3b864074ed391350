"""A token-shard dir with poisoned windows, for the loss-spike tests (test_trainer_spike.py, the docs demo).

The train split counts upwards through the lower half of the vocabulary (runs of 5 to 40 tokens from random
starts: quickly learnt); the windows that global samples ``[first, first + count)`` read (the loader's own
permutation, ``ShardLoader.global_windows``) are rewritten with random tokens from the upper half: the step
that reads them has a loss far above its history, as a corrupt shard gives in a real run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import _dist_harness as h
import numpy as np


def write_poisoned_token_dir(d: Path, first: int, count: int, seq_len: int = h.SEQ_T, seed: int = 0,
                             n_tokens: int = 6000, vocab: int = h.VOCAB_T) -> list[int]:
    """Write the dir; returns the poisoned window ids (of samples first .. first + count - 1)."""
    from lmforge.data.loader import ShardLoader

    h.write_token_dir(d, n_tokens, vocab)
    rng = np.random.default_rng(11)
    half = vocab // 2
    tokens = np.empty(n_tokens, dtype="uint16")
    pos = 0
    while pos < n_tokens:
        run = int(rng.integers(5, 41))
        start = int(rng.integers(0, half - 1))
        seq = (start + np.arange(run)) % (half - 1) + 1
        tokens[pos:pos + run] = seq[:n_tokens - pos]
        pos += run
    _write_train(d, tokens)
    windows = [int(w) for w in ShardLoader(d, "train", seq_len, 8, seed=seed).global_windows(first, count)]
    for w in windows:
        tokens[w * seq_len:(w + 1) * seq_len + 1] = rng.integers(half, vocab, seq_len + 1)
    _write_train(d, tokens)
    return windows


def _write_train(d: Path, tokens: np.ndarray) -> None:
    blob = tokens.tobytes()
    (d / "train_00000.bin").write_bytes(blob)
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(blob).hexdigest()
    (d / "index.json").write_text(json.dumps(index))


def patch_loader(monkeypatch, record_dir: Path | None = None, rank: int = 0, skip: tuple[int, int] | None = None):
    """In this process, make ShardLoader record the windows each training batch reads (as the CLI worker's
    LMFORGE_TEST_RECORD does) and/or jump from global sample ``skip[0]`` to ``skip[1]`` through its public
    state: the stream of a run whose data never held those samples."""
    from lmforge.data.loader import ShardLoader

    read = ShardLoader.next_batch

    def next_batch(self):
        if skip is not None and self.samples_seen == skip[0]:
            self.load_state_dict({**self.state_dict(), "samples_seen": skip[1]})
        if record_dir is not None:
            per_rank = self.global_batch // self.world_size
            ids = self.global_windows(self.samples_seen + self.rank * per_rank, per_rank)
            with open(Path(record_dir) / f"windows_rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"samples_seen": self.samples_seen, "windows": [int(i) for i in ids]}) + "\n")
        return read(self)

    monkeypatch.setattr(ShardLoader, "next_batch", next_batch)


def read_order(run_dir: Path) -> list[tuple[int, list[int]]]:
    """(samples consumed before the batch, its global window ids over all ranks) in the order rank 0 read them."""
    per_rank = []
    for p in sorted(Path(run_dir).glob("windows_rank*.jsonl")):
        per_rank.append([json.loads(line) for line in p.read_text().splitlines()])
    out = []
    for rows in zip(*per_rank):
        assert len({r["samples_seen"] for r in rows}) == 1, rows
        out.append((rows[0]["samples_seen"], sorted(w for r in rows for w in r["windows"])))
    return out
