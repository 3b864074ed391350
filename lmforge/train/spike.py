"""Loss-spike detection (``train.spike``): is this step's loss (or gradient norm) far above its recent history?

A step is a *spike* when its value is non-finite, or when at least ``min_history`` earlier steps are known
and the value lies above ``median + k · MAD`` of the last ``window`` of them (MAD: the median absolute
deviation from the median). Median and MAD ignore the outliers a mean and a standard deviation would
follow, and a falling loss never trips the test (only a rise above the median does). The MAD is floored
at ``MAD_FLOOR × |median|`` so that a flat history does not turn every small rise into a spike.

Only steps that were applied (finite and not spikes) enter the history, so a spike never raises the bar for
the next one. The history is part of the trainer's checkpointed state: a resume, or a rollback to a
checkpoint, continues with exactly the history that checkpoint saw.

This module is pure Python (no torch): the Trainer (`lmforge.train.trainer`) feeds it the step's global
loss and grad norm, which every rank holds after the step's all-reduce, and acts on the verdict together
with the other ranks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

MAD_FLOOR = 1e-3  # the MAD is at least this fraction of |median| (a flat history is not a zero-width band)
METRICS = {"loss": ("loss",), "grad_norm": ("grad_norm",), "both": ("loss", "grad_norm")}


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (the mean of the middle two for an even count)."""
    s = sorted(values)
    n = len(s)
    if not n:
        raise ValueError("median of an empty sequence")
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def mad(values: Sequence[float], center: float | None = None) -> float:
    """Median absolute deviation of ``values`` from ``center`` (default: their median)."""
    c = median(values) if center is None else center
    return median([abs(v - c) for v in values])


def threshold(values: Sequence[float], k: float) -> float:
    """``median + k · max(MAD, MAD_FLOOR · |median|)`` of ``values``."""
    m = median(values)
    return m + k * max(mad(values, m), MAD_FLOOR * abs(m))


@dataclass
class Verdict:
    """Why a step is a spike: the metric that tripped, its value and the threshold it crossed (None when the
    value was not finite)."""

    metric: str  # loss | grad_norm (| peer: another rank saw it)
    value: float
    threshold: float | None
    median: float | None = None

    @property
    def nonfinite(self) -> bool:
        return self.threshold is None and self.metric != "peer"

    def describe(self) -> str:
        if self.metric == "peer":  # another rank's verdict (the values are the same everywhere, so: rare)
            return f"a spike seen by another rank (loss {self.value:.4g})"
        if self.nonfinite:
            return f"non-finite {self.metric.replace('_', ' ')} ({self.value})"
        return (f"{self.metric.replace('_', ' ')} {self.value:.4g} above the threshold {self.threshold:.4g} "
                f"(median {self.median:.4g})")

    def row(self) -> dict[str, Any]:
        """The fields of the metrics event."""
        return {"metric": self.metric, "value": self.value, "threshold": self.threshold, "median": self.median}


class SpikeDetector:
    """Running history of the applied steps' loss and grad norm, and the spike test over it.

    ``check(loss, grad_norm)`` -> a :class:`Verdict` or None; ``observe(loss, grad_norm)`` adds an applied
    step to the history; ``state_dict()`` / ``load_state_dict()`` save and restore the history (JSON-safe).
    """

    def __init__(self, metric: str = "loss", window: int = 100, k: float = 6.0, min_history: int = 20):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is not one of {sorted(METRICS)}")
        if window < 1 or not 1 <= min_history <= window or not (math.isfinite(k) and k > 0):
            raise ValueError(f"need window >= min_history >= 1 and k > 0 (got {window}, {min_history}, {k})")
        self.metric, self.window, self.k, self.min_history = metric, window, k, min_history
        self.history: dict[str, deque[float]] = {name: deque(maxlen=window) for name in ("loss", "grad_norm")}

    @classmethod
    def from_config(cls, spike_cfg) -> SpikeDetector:
        return cls(spike_cfg.metric, spike_cfg.window, spike_cfg.k, spike_cfg.min_history)

    def check(self, loss: float, grad_norm: float) -> Verdict | None:
        """The spike verdict for a step with these global values (None: not a spike). A non-finite loss or
        grad norm is always a spike, whatever ``metric`` watches and however short the history."""
        values = {"loss": loss, "grad_norm": grad_norm}
        for name in ("loss", "grad_norm"):
            if not math.isfinite(values[name]):
                return Verdict(name, values[name], None)
        for name in METRICS[self.metric]:
            hist = self.history[name]
            if len(hist) < self.min_history:
                continue
            m = median(hist)
            bar = threshold(hist, self.k)
            if values[name] > bar:
                return Verdict(name, values[name], bar, m)
        return None

    def observe(self, loss: float, grad_norm: float) -> None:
        """Add an applied step's values (finite ones only) to the history."""
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            if math.isfinite(value):
                self.history[name].append(float(value))

    def state_dict(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict[str, Iterable[float]] | None) -> None:
        """Restore the history (the newest ``window`` values; an older checkpoint without one: empty)."""
        for name, values in self.history.items():
            values.clear()
            values.extend(float(v) for v in (state or {}).get(name, []) if math.isfinite(float(v)))


__all__ = ["MAD_FLOOR", "METRICS", "SpikeDetector", "Verdict", "mad", "median", "threshold"]
