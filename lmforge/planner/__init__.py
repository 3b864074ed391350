"""lmforge.planner: parameters, FLOPs, memory per GPU and time for a training or inference plan; no model
is built. Modes in `modes`, activation memory in `activations`, allocator levels in `allocator`,
published measurements it is held to in `calibration`.

Names are imported lazily; nothing here imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PlanRequest": "lmforge.planner.estimate",
    "estimate": "lmforge.planner.estimate",
    "suggest": "lmforge.planner.estimate",
    "estimate_activations": "lmforge.planner.activations",
    "Frozen": "lmforge.planner.activations",
    "AC_POLICIES": "lmforge.planner.activations",
    "MODES": "lmforge.planner.modes",
    "GPUS": "lmforge.planner.hardware",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.planner' has no attribute '{name}'")
