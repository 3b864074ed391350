"""Which dev examples a capped evaluation scores: a seeded sample, independent of length.

``eval.batches × eval.batch_size`` caps the dev set. Keeping the first (or the longest) examples would
bias val loss, accuracy, early stopping and the majority baseline; a sample drawn with the run's seed
is unbiased and the same at every evaluation of the run (and on every rank).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def eval_order(lengths: Sequence[int], cap: int | None, seed: int) -> list[int]:
    """Indices of the examples to evaluate: all of them, or a seeded sample of ``cap`` when there are
    more; ordered longest first so that examples of similar length share a batch (less padding)."""
    chosen = list(range(len(lengths)))
    if cap is not None and len(chosen) > cap:
        chosen = random.Random(f"lmforge-eval/{seed}").sample(chosen, cap)
    return sorted(chosen, key=lambda i: (-lengths[i], i))


__all__ = ["eval_order"]
