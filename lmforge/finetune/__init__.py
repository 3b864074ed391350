"""Fine-tuning: instruction SFT, LoRA and classification recipes over the shared Trainer, and their data layer.

Names are imported lazily so config checks and `lmforge --help` never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FinetuneConfig": "lmforge.finetune.config",
    "load_config": "lmforge.finetune.config",
    "finetune": "lmforge.finetune.recipes",
    "FinetuneResult": "lmforge.finetune.recipes",
    "load_adapter": "lmforge.artifacts.adapter_dir",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.finetune' has no attribute '{name}'")
