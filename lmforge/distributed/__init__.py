"""Scale-out with PyTorch's own stack: process group, the World (one DeviceMesh), TP -> AC -> compile -> FSDP2.

Names are imported lazily so config validation (and `lmforge model info`) never imports torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelConfig": "lmforge.distributed.config",
    "ParallelDims": "lmforge.distributed.config",
    "DistInfo": "lmforge.distributed.process_group",
    "init_distributed": "lmforge.distributed.process_group",
    "shutdown_distributed": "lmforge.distributed.process_group",
    "launched_by_torchrun": "lmforge.distributed.process_group",
    "all_reduce_mean": "lmforge.distributed.process_group",
    "barrier": "lmforge.distributed.process_group",
    "World": "lmforge.distributed.world",
    "setup_world": "lmforge.distributed.world",
    "parallelize_model": "lmforge.distributed.world",
    "build_for_world": "lmforge.distributed.world",
    "no_sync": "lmforge.distributed.world",
    "unwrap": "lmforge.distributed.world",
    "CollectiveDeviceError": "lmforge.distributed.collectives",
    "parallelize": "lmforge.distributed.apply",
    "apply_tp": "lmforge.distributed.apply",
    "apply_ac": "lmforge.distributed.apply",
    "apply_compile": "lmforge.distributed.apply",
    "apply_fsdp": "lmforge.distributed.apply",
    "apply_ddp": "lmforge.distributed.apply",
    "set_grad_sync": "lmforge.distributed.apply",
    "compute_dtypes": "lmforge.distributed.apply",
    "Watchdog": "lmforge.distributed.watchdog",
    "ShardedInit": "lmforge.distributed.materialize",
    "ShardedLoad": "lmforge.distributed.materialize",
    "materialize": "lmforge.distributed.materialize",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.distributed' has no attribute '{name}'")
