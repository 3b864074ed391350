"""Where the trainer meets the world: which rank this is, which device, and the ONE hook that turns the
single-device model into whatever the job runs (`parallelize_model`).

The hook hands the model to `lmforge.distributed.apply` with the config's ``parallel`` section:
tensor parallel -> activation checkpointing -> compile -> FSDP2 (HSDP / DDP per ``dp_replicate`` /
``dp_shard``), in place and without renaming a parameter. The training loop does not change.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0  # which slice of the global batch this rank reads
    dp_size: int = 1  # how many slices the global batch is cut into
    dims: Any = None  # lmforge.distributed.ParallelDims of this job
    dist_info: Any = None  # lmforge.distributed.DistInfo (holds the failure watchdog)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; set train.device=cpu (or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _parallel_cfg(cfg):
    """The config's ``parallel`` section (defaults when a recipe's config has none); train.compile folds in."""
    from lmforge.distributed.config import ParallelConfig

    pcfg = getattr(cfg, "parallel", None)
    if not isinstance(pcfg, ParallelConfig):
        pcfg = ParallelConfig()
    train = getattr(cfg, "train", None)
    if getattr(train, "compile", False) and not pcfg.compile:
        pcfg = replace(pcfg, compile=True)
    return pcfg


def setup_world(device_pref: str = "auto", parallel=None) -> tuple[World, torch.device]:
    """Rank and world; under torchrun, join (create) the process group first (nccl on CUDA, gloo on CPU).

    ``parallel`` (the config's parallel section) sets the process-group timeout and the data-parallel
    layout: tensor-parallel peers read the same slice of the global batch (dp_rank = rank // tp).
    """
    from lmforge.distributed.config import ParallelConfig, ParallelDims
    from lmforge.distributed.process_group import init_distributed, launched_by_torchrun

    pcfg = parallel if parallel is not None else ParallelConfig()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    dist_info = None
    if launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        dist_info = init_distributed(pcfg.timeout_s, device=device.type)
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dims = ParallelDims.from_config(pcfg, size)
        world = World(rank, size, local_rank, dp_rank=dims.dp_rank(rank), dp_size=dims.dp, dims=dims,
                      dist_info=dist_info)
        _set_dp_group(dims, rank)
    else:
        world = World(dims=ParallelDims.from_config(pcfg, 1))
    device = pick_device(device_pref, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left (docs/gpu.md)
    return world, device


_DP_GROUP = None  # the ranks that share this rank's TP index (None = the whole world)


def _set_dp_group(dims, rank: int) -> None:
    """Sums over data (losses, token counts) must skip TP peers, which hold the same batch."""
    global _DP_GROUP
    _DP_GROUP = None
    if dims.tp > 1:
        for t in range(dims.tp):  # every rank creates every group, in the same order
            group = dist.new_group([r for r in range(dims.world_size) if r % dims.tp == t])
            if rank % dims.tp == t:
                _DP_GROUP = group


def parallelize_model(model: nn.Module, cfg, world: World, device: torch.device) -> nn.Module:
    """THE parallelization hook: single-device model in, the model the training loop runs out (same object).

    A model built on the meta device (`build_for_world`) gets its weights here: after TP -> AC -> compile ->
    FSDP2 when its parameters end up sharded (each rank allocates and fills only its shards), before
    parallelizing otherwise (DDP broadcasts real weights; a single process just materializes).
    """
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelDims
    from lmforge.distributed.materialize import is_meta, materialize, weight_source

    pcfg = _parallel_cfg(cfg)
    dims = world.dims if world.dims is not None else ParallelDims.from_config(pcfg, world.world_size)
    if dist.is_available() and dist.is_initialized() and dims.tp > 1 and _DP_GROUP is None:
        _set_dp_group(dims, world.rank)
    precision = getattr(getattr(cfg, "train", None), "precision", None)
    on_meta = is_meta(model)
    source = weight_source(model)
    if on_meta and source is not None and world.is_main:
        from lmforge.console import info

        where = "each rank its shards" if shards_parameters(dims) else "whole"
        info(f"model: {source.describe()} on the meta device, materialized {where}")
    if on_meta and not shards_parameters(dims):
        materialize(model, device)
    parallelize(model, pcfg, dims, device=device, precision=precision)
    if on_meta and is_meta(model):
        materialize(model, device)
    return model


def shards_parameters(dims) -> bool:
    """Whether this job's parameters are DTensor shards (FSDP2/HSDP or tensor parallel) under a process group."""
    return (dist.is_available() and dist.is_initialized()
            and (dims.data_parallel in ("fsdp", "hsdp") or dims.tp > 1))


def build_for_world(mcfg, world: World, device: torch.device, *, seed: int | None = None, init: bool = True,
                    model_dir: str | None = None) -> nn.Module:
    """The recipe's model: full on ``device`` when one rank holds it all, on the meta device when the job
    shards parameters (`parallelize_model` then allocates and fills only each rank's shards).

    Weights: loaded from ``model_dir`` (each rank reads only its slices of the safetensors files), else the
    seeded init (``init``; bitwise the 1-process init), else left for a checkpoint load.
    """
    from lmforge.distributed.materialize import ShardedInit, ShardedLoad, attach_weights
    from lmforge.models.transformer import Transformer, build_model

    dims = world.dims
    if dims is None or not shards_parameters(dims):
        if model_dir is not None:
            from lmforge.artifacts.model_dir import load_model_dir

            return load_model_dir(model_dir, device=device)
        return build_model(mcfg, device=device, dtype=torch.float32, seed=seed, init=init)
    with torch.device("meta"):
        model = Transformer(mcfg)
    source = ShardedLoad(model_dir) if model_dir is not None else (ShardedInit(seed or 0) if init else None)
    return attach_weights(model, source)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (FSDP2 and TP work in place: nothing to strip)."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulation.

    The flag is set (not restored on exit) because FSDP2 reads it during backward, which the
    trainer runs after this context; the last micro-batch (skip=False) turns syncing back on.
    """
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    from lmforge.distributed.apply import set_grad_sync

    set_grad_sync(model, not skip)
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks (TP peers hold the same data and are counted once)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_DP_GROUP)
    return t


def failure_guard(world: World):
    """Wrap the training run: a rank failing (or dying) makes the others exit naming it (see
    `lmforge.distributed.watchdog`); a no-op without a process group."""
    info = world.dist_info
    if info is not None and info.watchdog is not None:
        return info.watchdog.guard()
    return contextlib.nullcontext()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
