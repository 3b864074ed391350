"""A resumable position in an epoch-by-epoch, seeded order of units (examples, packed rows).

Every epoch reorders the units (``order(epoch)``; by default a permutation seeded by ``(seed, epoch)``).
A global batch is ``global_batch`` consecutive units of that order and rank ``r`` of ``world_size`` takes
its contiguous ``global_batch // world_size`` slice, so the global stream does not depend on the number
of ranks and a resume on another world size continues it exactly. The last incomplete global batch of an
epoch is dropped. Fine-tuning's batch sources (`SFTBatchIterator`, `LabelledBatches`) build on this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmforge.config import UserError


def check_batch_layout(n_units: int, global_batch: int, world_size: int, what: str) -> None:
    """A global batch of ``global_batch`` units splits evenly over ``world_size`` ranks and the data holds
    at least one; otherwise a one-line error naming the fix (``what``: "examples", "pairs", "packed rows")."""
    if global_batch % world_size:
        fix = -(-global_batch // world_size) * world_size
        raise UserError(f"train.global_batch={global_batch} is not divisible by {world_size} ranks; try {fix}")
    if n_units < global_batch:
        raise UserError(f"data.train holds {n_units} {what}, fewer than one global batch of {global_batch}; "
                        "lower train.global_batch or add data")


def weight_examples(groups: list[list[Any]], weights: list[float], seed: int) -> list[Any]:
    """A weighted ``data.train`` list's epoch: group ``g`` (one file's examples) contributes ``round(w × n)``
    examples — ``floor(w)`` copies of every example plus a subset of the rest, seeded by ``(seed, g)`` — in
    file order (the epoch permutation shuffles them). The same list on every rank and every start."""
    import numpy as np

    out: list[Any] = []
    for g, (examples, w) in enumerate(zip(groups, weights)):
        n = len(examples)
        k = round(w * n)
        whole, rest = divmod(k, n) if n else (0, 0)
        out += list(examples) * whole
        if rest:
            pick = np.sort(np.random.default_rng([seed, g, 0x77]).choice(n, rest, replace=False))
            out += [examples[int(i)] for i in pick]
    return out


class EpochCursor:
    def __init__(self, n_units: int, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 order: Callable[[int], list[int]] | None = None):
        if global_batch <= 0 or world_size <= 0 or not 0 <= rank < world_size or global_batch % world_size:
            raise ValueError(f"bad batch layout: global_batch={global_batch}, rank={rank}, "
                             f"world_size={world_size}")
        self.n_units, self.global_batch, self.rank, self.world_size = n_units, global_batch, rank, world_size
        self.seed = seed
        self._order_fn = order or self.permutation
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order: list[int] | None = None

    def permutation(self, epoch: int) -> list[int]:
        import numpy as np

        return np.random.default_rng([self.seed, epoch]).permutation(self.n_units).tolist()

    @property
    def batches_per_epoch(self) -> int:
        return self.n_units // self.global_batch

    @property
    def samples_seen(self) -> int:
        return (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.global_batch

    def next_slice(self) -> list[int]:
        """This rank's unit indices of the next global batch (moving on to the next epoch when due)."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = self._order_fn(self.epoch)
        local = self.global_batch // self.world_size
        start = self.batch_in_epoch * self.global_batch + self.rank * local
        self.batch_in_epoch += 1
        return self._order[start:start + local]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._order = None
