"""Training: the Trainer loop, optimizer + schedules, DCP checkpoints, metrics, the pretraining recipe.

Names are imported lazily so `lmforge --help` and config checks never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PretrainConfig": "lmforge.train.config",
    "load_config": "lmforge.train.config",
    "grad_accum_steps": "lmforge.train.config",
    "Trainer": "lmforge.train.trainer",
    "TrainResult": "lmforge.train.trainer",
    "TrainingDiverged": "lmforge.train.trainer",
    "causal_lm_loss": "lmforge.train.batches",
    "LRSchedule": "lmforge.train.schedule",
    "build_optimizer": "lmforge.train.optim",
    "param_groups": "lmforge.train.optim",
    "CheckpointManager": "lmforge.train.checkpoint",
    "latest_checkpoint": "lmforge.train.checkpoint",
    "pretrain": "lmforge.train.pretrain",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute '{name}'")
