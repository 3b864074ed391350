"""Learning-rate schedules as pure functions of the step: warmup + cosine, warmup-stable-decay, constant,
linear. A schedule holds no mutable state, so resuming at step s gives exactly the lr it would have had."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    name: str  # cosine | wsd | constant | linear
    lr: float  # peak learning rate
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    decay_fraction: float = 0.2  # wsd only: the last fraction of the steps decays
    decay_shape: str = "linear"  # wsd only: linear | cosine | sqrt (1 - sqrt(progress))

    def __call__(self, step: int) -> float:
        """Learning rate for the update made at 0-based ``step``."""
        if step < self.warmup_steps:  # linear warmup, reaching lr at the last warmup step
            return self.lr * (step + 1) / self.warmup_steps
        if self.name == "constant":
            return self.lr
        if self.name == "wsd":
            decay_steps = max(1, round(self.decay_fraction * self.total_steps))
            start = max(self.warmup_steps, self.total_steps - decay_steps)
            if step < start:
                return self.lr
            return self._decay((step - start) / max(1, self.total_steps - start), self.decay_shape)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self._decay(progress, "cosine" if self.name == "cosine" else "linear")

    def _decay(self, progress: float, shape: str) -> float:
        p = min(1.0, max(0.0, progress))
        if shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * p))
        elif shape == "sqrt":
            factor = 1.0 - math.sqrt(p)
        else:
            factor = 1.0 - p
        return self.min_lr + (self.lr - self.min_lr) * factor

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_config(cls, schedule_cfg, lr: float, total_steps: int) -> LRSchedule:
        min_lr = schedule_cfg.min_lr if schedule_cfg.min_lr is not None else 0.1 * lr
        return cls(schedule_cfg.name, lr, total_steps, schedule_cfg.warmup_steps, min_lr,
                   schedule_cfg.decay_fraction, schedule_cfg.decay_shape)
