"""Weighted mixtures of token-shard dirs (``data.sources``), with weights that may change by step
(``data.schedule``).

Each source is a :class:`~lmforge.data.loader.ShardLoader` over its own shard dir. Source ``s`` has its own
stream of windows: epoch 0's permutation of its ``W_s`` windows, then epoch 1's, … (a Feistel permutation
keyed by the run's seed and the source's *name*, so reordering or adding sources leaves each order as it
was). Its *cursor* ``c_s`` counts the windows taken from that stream so far.

Which source global sample ``i`` comes from is a pure function of ``(seed, i, weights of its step, the
sources still in the mix)``: a seeded Weyl sequence ``u_i = frac(offset(seed) + i·φ)`` (φ the golden ratio,
in 64-bit fixed point, so exact for any ``i``) picks the source whose cumulative weight interval holds
``u_i``. The sequence is low-discrepancy: over any stretch of ``n`` samples each source's count is within
``O(log n)`` of ``n × weight``, much tighter than independent draws. Sample ``i`` of source ``s`` is the
next window of ``s``'s stream, so no window of a source repeats before all its windows have been seen.

Global batch ``k`` is samples ``[samples_seen, samples_seen + B)`` with the weights of step ``k``; every
rank computes the whole batch's assignment (cheap) and reads only its ``B / R`` slice. The state —
``(samples_seen, batches_seen, cursor of every source)`` — is the same on every rank, so a run saved on
any number of ranks resumes on any other with the same windows in the same global order.

At exhaustion (``c_s`` reaches ``W_s``) a source with ``on_exhaust: repeat`` goes on with its next epoch's
permutation; one with ``stop`` leaves the mix and the other weights are renormalised from that sample on.
When no source with a positive weight is left, :class:`DataExhausted` is raised before anything of that
batch is consumed (the Trainer then ends the run cleanly, like reaching ``max_steps``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lmforge.config import UserError
from lmforge.data.loader import ShardLoader, document_ids
from lmforge.data.remote import is_remote, parse_index_bytes, read_remote_index_bytes
from lmforge.data.shards import check_index, read_index

_MASK64 = (1 << 64) - 1
_PHI64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the Weyl step


class DataExhausted(Exception):
    """Every source with a positive weight is exhausted (all ``on_exhaust: stop``): the run ends here."""


@dataclass(frozen=True)
class Source:
    name: str
    dir: str
    weight: float = 1.0
    on_exhaust: str = "repeat"  # repeat | stop


@dataclass(frozen=True)
class MixPhaseSpec:
    until_step: int  # the phase covers steps [previous phase's until_step (or 0), until_step)
    weights: Mapping[str, float]
    interpolate: str = "constant"  # constant | linear (from the previous phase's weights to these)


@dataclass
class MixSchedule:
    """Per-step source weights: the sources' weights, then each phase in turn (the last one holds on)."""

    names: list[str]
    base: list[float]
    phases: list[MixPhaseSpec] = field(default_factory=list)

    def weights(self, step: int) -> np.ndarray:
        prev = np.asarray(self.base, dtype=np.float64)
        start = 0
        for ph in self.phases:
            target = np.asarray([float(ph.weights.get(n, 0.0)) for n in self.names], dtype=np.float64)
            if step < ph.until_step:
                if ph.interpolate == "linear":
                    t = (step + 1 - start) / (ph.until_step - start)  # the target on the phase's last step
                    return (1.0 - t) * prev + t * target
                return target
            prev, start = target, ph.until_step
        return prev

    def weights_for_steps(self, steps: np.ndarray) -> np.ndarray:
        """(len(steps), S) weights (vectorised :meth:`weights`)."""
        steps = np.asarray(steps, dtype=np.int64)
        out = np.tile(np.asarray(self.base, dtype=np.float64), (len(steps), 1))
        prev = out[0].copy() if len(steps) else np.asarray(self.base, dtype=np.float64)
        start = 0
        done = np.zeros(len(steps), dtype=bool)
        for ph in self.phases:
            target = np.asarray([float(ph.weights.get(n, 0.0)) for n in self.names], dtype=np.float64)
            here = ~done & (steps < ph.until_step)
            if ph.interpolate == "linear":
                t = ((steps[here] + 1 - start) / (ph.until_step - start))[:, None]
                out[here] = (1.0 - t) * prev + t * target
            else:
                out[here] = target
            done |= here
            prev, start = target, ph.until_step
        out[~done] = prev
        return out


def source_seed(seed: int, name: str) -> int:
    """The permutation seed of one source: the run's seed and the source's name (not its position)."""
    return (int(seed) * 0x100000001B3 + zlib.crc32(name.encode("utf-8"))) & _MASK64


def weyl_uniforms(seed: int, start: int, count: int) -> np.ndarray:
    """``u_i`` in [0, 1) for global samples ``i`` in ``[start, start + count)`` (exact 64-bit arithmetic)."""
    offset = int(np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, 0x6D6978]).generate_state(
        1, dtype=np.uint64)[0])
    first = (offset + start * _PHI64) & _MASK64
    i = np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = np.uint64(first) + i * np.uint64(_PHI64)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def assign_sources(seed: int, start: int, count: int, weights: np.ndarray, cursors: Sequence[int],
                   limits: Sequence[float]) -> np.ndarray:
    """Source index of each global sample ``[start, start + count)`` drawn with ``weights`` (one step's), where
    source ``s`` can give at most ``limits[s] - cursors[s]`` more windows (``inf`` for ``repeat`` sources): a
    source that runs out leaves the mix at that sample and the rest is renormalised. Raises
    :class:`DataExhausted` when the ``count`` samples cannot all be drawn."""
    weights = np.asarray(weights, dtype=np.float64)
    used = np.asarray(cursors, dtype=np.float64).copy()
    limits = np.asarray(limits, dtype=np.float64)
    out = np.empty(count, dtype=np.int64)
    pos = 0
    while pos < count:
        w = np.where(used < limits, weights, 0.0)
        total = float(w.sum())
        if not total > 0.0:
            raise DataExhausted(f"every source with a positive weight is exhausted at sample {start + pos:,}")
        cum = np.cumsum(w / total)
        last = int(np.flatnonzero(w > 0)[-1])
        idx = np.minimum(np.searchsorted(cum, weyl_uniforms(seed, start + pos, count - pos), side="right"), last)
        take = count - pos
        for s in np.flatnonzero(np.isfinite(limits)):  # stop sources: cut where one runs out
            room = limits[s] - used[s]
            hits = np.flatnonzero(idx[:take] == s)
            if len(hits) > room:
                take = int(hits[int(room)])  # the sample that would overdraw s starts the next round
        out[pos:pos + take] = idx[:take]
        used += np.bincount(idx[:take], minlength=len(weights))
        pos += take
    return out


def check_same_tokenizer(indexes: Mapping[str, dict[str, Any]], dirs: Mapping[str, str]) -> None:
    """Every source was prepared with the same tokenizer (the hash each index records); one line otherwise."""
    first = next(iter(indexes))
    want = indexes[first].get("tokenizer_hash")
    for name, index in indexes.items():
        if index.get("tokenizer_hash") != want:
            raise UserError(f"data.sources: '{name}' ({dirs[name]}) was prepared with tokenizer "
                            f"{index.get('tokenizer_hash')} but '{first}' ({dirs[first]}) with {want}; prepare "
                            "every source with the same tokenizer (`lmforge prepare --tokenizer DIR`)")


def read_source_indexes(sources: Sequence[Source]) -> dict[str, dict[str, Any]]:
    """``index.json`` of every source (local or s3:// / gs://), checked to share one tokenizer."""
    indexes = {}
    for s in sources:
        if is_remote(s.dir):
            where = f"{s.dir.rstrip('/')}/index.json"
            indexes[s.name] = check_index(parse_index_bytes(read_remote_index_bytes(s.dir), where), where)
        else:
            indexes[s.name] = read_index(s.dir)
    check_same_tokenizer(indexes, {s.name: s.dir for s in sources})
    return indexes


class MixtureLoader:
    """The weighted mixture of several token-shard dirs; the same interface as :class:`ShardLoader`
    (``next_batch``, ``eval_batches``, ``state_dict`` / ``load_state_dict``), see the module docstring."""

    def __init__(self, sources: Sequence[Source], schedule: MixSchedule | None = None, split: str = "train",
                 seq_len: int = 512, global_batch: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0,
                 check_vocab: int | None = None, tokenizer_hash: str | None = None, doc_mask: bool = False,
                 verify: bool = False, cache_dir: str | None = None):
        if not sources:
            raise UserError("data.sources is empty; list at least one {name, dir, weight}")
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.schedule = schedule or MixSchedule(self.names, [s.weight for s in self.sources])
        self.loaders: list[ShardLoader] = []
        for s in self.sources:
            self.loaders.append(ShardLoader(s.dir, split, seq_len, global_batch, rank, world_size,
                                            source_seed(seed, s.name), check_vocab, tokenizer_hash, doc_mask,
                                            verify, cache_dir))
        check_same_tokenizer({s.name: ld.index for s, ld in zip(self.sources, self.loaders)},
                             {s.name: s.dir for s in self.sources})
        self.index = self.loaders[0].index
        self.split, self.seq_len, self.global_batch = split, seq_len, global_batch
        self.rank, self.world_size, self.seed, self.doc_mask = rank, world_size, seed, doc_mask
        self.eos_id = self.index.get("eos_id")
        self.limits = [ld.num_windows if s.on_exhaust == "stop" else math.inf
                       for s, ld in zip(self.sources, self.loaders)]
        self.cursors = [0] * len(self.sources)  # windows taken from each source's stream
        self.samples_seen = 0  # global samples consumed, all ranks together
        self.batches_seen = 0  # global batches consumed = the step whose weights the next batch uses

    @property
    def num_windows(self) -> dict[str, int]:
        return {n: ld.num_windows for n, ld in zip(self.names, self.loaders)}

    def epochs(self) -> dict[str, float]:
        """Epochs of each source consumed so far."""
        return {n: c / ld.num_windows for n, c, ld in zip(self.names, self.cursors, self.loaders)}

    def weights(self, step: int | None = None) -> dict[str, float]:
        """The schedule's weights at ``step`` (default: the next batch's), normalised over the sources still
        in the mix."""
        w = self.schedule.weights(self.batches_seen if step is None else step)
        w = np.where(np.asarray(self.cursors, dtype=np.float64) < np.asarray(self.limits), w, 0.0)
        total = float(w.sum())
        return {n: (float(v) / total if total > 0 else 0.0) for n, v in zip(self.names, w)}

    def assignment(self, step: int, start: int, count: int, cursors: Sequence[int] | None = None) -> np.ndarray:
        """Source index of global samples ``[start, start + count)`` drawn with step ``step``'s weights."""
        return assign_sources(self.seed, start, count, self.schedule.weights(step),
                              self.cursors if cursors is None else cursors, self.limits)

    def next_batch(self):
        """This rank's slice of the next global batch, as :meth:`ShardLoader.next_batch`; raises
        :class:`DataExhausted` (consuming nothing) when the mixture cannot fill it."""
        per_rank = self.global_batch // self.world_size
        src = self.assignment(self.batches_seen, self.samples_seen, self.global_batch)
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        rows = torch.empty((per_rank, self.seq_len + 1), dtype=torch.long)
        for s, ld in enumerate(self.loaders):
            before = int(np.count_nonzero(src[:lo] == s))
            mine = np.flatnonzero(src[lo:hi] == s)
            if len(mine):
                rows[torch.from_numpy(mine)] = ld._read_windows(ld.global_windows(self.cursors[s] + before,
                                                                                  len(mine)))
        counts = np.bincount(src, minlength=len(self.loaders))
        self.cursors = [c + int(n) for c, n in zip(self.cursors, counts)]
        self.samples_seen += self.global_batch
        self.batches_seen += 1
        if not self.doc_mask:
            return rows
        return rows, document_ids(rows, int(self.eos_id))

    def __iter__(self):
        while True:
            yield self.next_batch()

    # --- evaluation --------------------------------------------------------------------------------
    def has_split(self, name: str, split: str = "val") -> bool:
        ld = self.loaders[self.names.index(name)]
        return bool(ld.index["splits"].get(split, {}).get("tokens"))

    def eval_batches(self, n_batches: int, batch_size: int, split: str | None = None,
                     source: str | None = None) -> Iterator:
        """One source's evaluation batches (``source``), or every source's with a val split one after the
        other (``n_batches`` each)."""
        names = [source] if source is not None else [n for n in self.names if self.has_split(n, split or "val")]

        def gen():
            for n in names:
                yield from self.loaders[self.names.index(n)].eval_batches(n_batches, batch_size, split)

        return gen()

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"kind": "mixture", "samples_seen": self.samples_seen, "batches_seen": self.batches_seen,
                "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "tokenizer_hash": self.index.get("tokenizer_hash"),
                "sources": {n: {"cursor": c, "num_windows": ld.num_windows, "num_tokens": ld.num_tokens,
                                "epoch": c // ld.num_windows}
                            for n, c, ld in zip(self.names, self.cursors, self.loaders)}}

    def load_state_dict(self, state: dict[str, Any]) -> list[str]:
        """Restore the position; returns notes (sources added since the checkpoint start at 0)."""
        if state.get("kind") != "mixture":
            raise UserError("loader state was saved by a single data.dir run, not a data.sources mixture; resume "
                            "with the same data settings")
        for key, have in (("seed", self.seed), ("seq_len", self.seq_len),
                          ("tokenizer_hash", self.index.get("tokenizer_hash"))):
            if key in state and state[key] != have:
                raise UserError(f"loader state was saved with {key}={state[key]!r} but this loader has {have!r}; "
                                "resume on the same data and settings")
        saved = state.get("sources") or {}
        notes = []
        cursors = []
        for n, ld in zip(self.names, self.loaders):
            entry = saved.get(n)
            if entry is None:
                notes.append(f"data.sources: '{n}' is new since the checkpoint; it starts at its first window")
                cursors.append(0)
                continue
            if int(entry.get("num_tokens", ld.num_tokens)) != ld.num_tokens:
                raise UserError(f"data.sources: '{n}' held {int(entry['num_tokens']):,} train tokens at the "
                                f"checkpoint but {ld.num_tokens:,} now; resume on the same data")
            cursors.append(int(entry["cursor"]))
        gone = sorted(set(saved) - set(self.names))
        if gone:
            notes.append(f"data.sources: {', '.join(gone)} left the mixture since the checkpoint")
        self.cursors = cursors
        self.samples_seen = int(state["samples_seen"])
        self.batches_seen = int(state["batches_seen"])
        return notes


def expected_tokens(names: Sequence[str], schedule: MixSchedule, steps: int, samples_per_step: int,
                    seq_len: int, windows: Mapping[str, int] | None = None,
                    on_exhaust: Mapping[str, str] | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Expected training tokens per source over ``steps`` steps (the weights integrated step by step; a
    ``stop`` source whose ``windows`` run out leaves the mix and the others are renormalised). Returns
    ``({name: {"tokens", "share", "epochs" (when windows are known), "exhausted_at_step"}}, steps the data
    lasts)`` (fewer than ``steps`` when every source with a weight has stopped)."""
    w = schedule.weights_for_steps(np.arange(steps)) if steps else np.zeros((0, len(names)))
    n = len(names)
    limit = np.array([windows[nm] if windows and (on_exhaust or {}).get(nm) == "stop" else np.inf
                      for nm in names], dtype=np.float64)
    alive = np.ones(n, dtype=bool)
    used = np.zeros(n)
    exhausted_at = [None] * n
    step = 0
    last_step = steps
    while step < steps:
        ww = w[step:] * alive
        tot = ww.sum(axis=1, keepdims=True)
        if not (tot[:1] > 0).all():
            last_step = step
            break
        dead = np.flatnonzero(tot[:, 0] <= 0)
        end = steps if not len(dead) else step + int(dead[0])
        per = np.where(tot > 0, ww / np.where(tot > 0, tot, 1.0), 0.0)[:end - step] * samples_per_step
        cum = used + np.cumsum(per, axis=0)
        over = [(int(np.argmax(cum[:, s] > limit[s])), s) for s in range(n)
                if alive[s] and (cum[:, s] > limit[s]).any()]
        if over:
            k, s = min(over)
            used = used + (per[:k].sum(axis=0) if k else 0.0)
            step += k
            used[s] = limit[s]
            alive[s] = False
            exhausted_at[s] = step
            continue
        used = cum[-1] if len(cum) else used
        step = end
        if end < steps:
            last_step = end
            break
    total = float(used.sum()) or 1.0
    out: dict[str, dict[str, Any]] = {}
    for i, nm in enumerate(names):
        row: dict[str, Any] = {"tokens": float(used[i]) * seq_len, "share": float(used[i]) / total}
        if windows and nm in windows:
            row["epochs"] = float(used[i]) / windows[nm]
        row["exhausted_at_step"] = exhausted_at[i]
        out[nm] = row
    return out, last_step


__all__ = [
    "DataExhausted",
    "MixPhaseSpec",
    "MixSchedule",
    "MixtureLoader",
    "Source",
    "assign_sources",
    "check_same_tokenizer",
    "expected_tokens",
    "read_source_indexes",
    "source_seed",
    "weyl_uniforms",
]
