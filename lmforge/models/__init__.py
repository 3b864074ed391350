"""Model configs, presets and the Transformer.

Names are imported lazily so config-only tools (`lmforge model info`, the planner) never import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "lmforge.models.config",
    "RopeScaling": "lmforge.models.config",
    "PRESETS": "lmforge.models.presets",
    "get_preset": "lmforge.models.presets",
    "model_config_from_dict": "lmforge.models.presets",
    "preset_names": "lmforge.models.presets",
    "Transformer": "lmforge.models.transformer",
    "build_model": "lmforge.models.transformer",
    "count_params": "lmforge.models.transformer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.models' has no attribute '{name}'")
