"""Where the trainer meets the world: which rank this is, which device, and the ONE hook that turns the
single-device model into whatever the job runs (`parallelize_model`).

Today the hook applies DDP when there is more than one rank and `torch.compile` when asked; the
scale-out code (`lmforge.distributed`) plugs FSDP2 / tensor parallel / activation checkpointing in
here, in the fixed order TP -> AC -> compile -> FSDP2, without touching the training loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def setup_world(device_pref: str = "auto") -> tuple[World, torch.device]:
    """Rank and world from torch.distributed; under torchrun, join (create) the process group first."""
    if not (dist.is_available() and dist.is_initialized()) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = pick_device(device_pref, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        world = World(rank, size, local_rank, dp_rank=rank, dp_size=size)
    else:
        world = World()
    device = pick_device(device_pref, world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return world, device


def parallelize_model(model: nn.Module, cfg, world: World, device: torch.device) -> nn.Module:
    """THE parallelization hook: single-device model in, the model the training loop runs out."""
    if getattr(cfg.train, "compile", False):
        model = torch.compile(model)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def no_sync(model: nn.Module, skip: bool):
    """DDP: skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    import contextlib

    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
