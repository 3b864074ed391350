"""The one place that knows the rank layout: `World` owns the process group, the device and the DeviceMesh.

``setup_world`` joins (or, under torchrun, creates) the process group and builds ONE 3-D DeviceMesh
``("dp_replicate", "dp_shard", "tp")`` with `init_device_mesh`. Everything else takes its groups from the
World instead of deriving a layout of its own:

- ``world.tp_mesh``: tensor-parallel peers (neighbouring ranks: tp is the fastest mesh dimension);
- ``world.fsdp_mesh``: what FSDP2 shards over (``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP);
- ``world.ddp_mesh``: what DDP replicates over (``dp_replicate``);
- ``world.dp_mesh`` / ``world.dp_group``: every data-parallel rank (one per TP group), for the sums of
  losses, token counts and metrics (TP peers hold the same data and are counted once).

``dp_rank`` (which slice of the global batch this rank reads) is this rank's coordinate on the dp
dimensions of the mesh, so data sharding and gradient reduction cannot disagree.

``parallelize_model`` is the trainer's one hook: the single-device model in, the model the training loop
runs out (tensor parallel -> activation checkpointing -> compile -> FSDP2 / HSDP / DDP, in place, without
renaming a parameter; see `lmforge.distributed.apply`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import ConfigError
from lmforge.console import info
from lmforge.distributed import collectives
from lmforge.distributed.apply import parallelize, set_grad_sync
from lmforge.distributed.config import ParallelConfig, ParallelDims
from lmforge.distributed.materialize import (
    ShardedInit,
    ShardedLoad,
    attach_weights,
    is_meta,
    materialize,
    weight_source,
)
from lmforge.distributed.process_group import (
    DistInfo,
    cuda_device,
    current,
    destroy_at_exit,
    init_distributed,
    launched_by_torchrun,
)
from lmforge.models.transformer import Transformer, build_model

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(eq=False)
class World:
    """Where this process sits in the job; ``World()`` is a plain single process on the CPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dims: ParallelDims = field(default_factory=lambda: ParallelDims(1, 1, 1, 1))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None  # the job's DeviceMesh (None without a process group)
    dist_info: DistInfo | None = None  # holds the failure watchdog
    owns_group: bool = False  # the process group was created for this World (destroyed at exit)
    _dp_mesh: Any = field(default=None, init=False, repr=False)  # built on first use

    # ---- who am I ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None and collectives.initialized()

    def _coord(self) -> tuple[int, int, int]:
        """(replicate, shard, tp) coordinate of this rank on the mesh ((0, 0, 0) without one)."""
        if self.mesh is None:
            return 0, 0, 0
        r, s, t = self.mesh.get_coordinate()
        return r, s, t

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank reads (TP peers read the same one)."""
        r, s, _ = self._coord()
        return r * self.dims.dp_shard + s

    @property
    def dp_size(self) -> int:
        """How many slices the global batch is cut into."""
        return self.dims.dp

    @property
    def tp_rank(self) -> int:
        return self._coord()[2]

    # ---- sub-meshes and groups -------------------------------------------------------------------
    def _need_mesh(self, what: str):
        if self.mesh is None:
            raise RuntimeError(f"World.{what} needs a process group (launch with torchrun)")
        return self.mesh

    @property
    def tp_mesh(self):
        return self._need_mesh("tp_mesh")["tp"]

    @property
    def fsdp_mesh(self):
        """FSDP2's mesh: 1-D ``dp_shard``, or 2-D ``(dp_replicate, dp_shard)`` for HSDP."""
        mesh = self._need_mesh("fsdp_mesh")
        return mesh["dp_replicate", "dp_shard"] if self.dims.data_parallel == "hsdp" else mesh["dp_shard"]

    @property
    def ddp_mesh(self):
        return self._need_mesh("ddp_mesh")["dp_replicate"]

    @property
    def dp_mesh(self):
        """A 1-D mesh over every data-parallel rank of this rank's TP index (dp_replicate x dp_shard)."""
        mesh = self._need_mesh("dp_mesh")
        if self._dp_mesh is None:
            if self.dims.dp_replicate > 1 and self.dims.dp_shard > 1:
                self._dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
            else:
                self._dp_mesh = mesh["dp_replicate"] if self.dims.dp_replicate > 1 else mesh["dp_shard"]
        return self._dp_mesh

    @property
    def dp_group(self):
        """The process group of `dp_mesh` (None without a process group)."""
        return self.dp_mesh.get_group() if self.mesh is not None else None

    # ---- collectives (no-ops in a single process) ------------------------------------------------
    def all_reduce(self, t: torch.Tensor, op: str = "sum", over: str = "dp") -> torch.Tensor:
        """In-place all-reduce of ``t`` (on the group's device: checked) over the data-parallel ranks
        (``over="dp"``) or every rank (``over="world"``)."""
        if over not in ("dp", "world"):
            raise ValueError(f"over={over!r} is not 'dp' or 'world'")
        if not self.distributed:
            return t
        return collectives.all_reduce(t, op, self.dp_group if over == "dp" else None)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (TP peers hold the same data and are counted once)."""
        return self.all_reduce(t, "sum", "dp")

    def barrier(self) -> None:
        if self.distributed:
            collectives.barrier()

    def guard(self):
        """Wrap the training run: a rank failing (or dying) makes the others exit naming it (see
        `lmforge.distributed.watchdog`); a no-op without a process group."""
        info = self.dist_info
        if info is not None and info.watchdog is not None:
            return info.watchdog.guard()
        return contextlib.nullcontext()

    def close(self) -> None:
        """The run ended: its meshes are dropped; the process group stays for a later run in this process
        and, if lmforge created it, is destroyed when the process exits (`process_group.destroy_at_exit`).
        A group a caller made (a test harness) stays for its owner to destroy."""
        if self.dist_info is not None:
            self.dist_info.in_run = False
        self.mesh = self._dp_mesh = None

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} on {self.device}: {self.dims.describe()}"


# ---- building the world --------------------------------------------------------------------------
def side_group(backend: str = "gloo"):
    """A process group of every rank, of its own, for work beside training (asynchronous checkpoint saves run
    DCP on gloo in a background thread), so its collectives never interleave with the training loop's on the
    World's groups. Every rank calls it at the same point; None without a process group of 2+ ranks."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend=backend)


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (auto | cuda | cpu) -> this rank's device (`process_group.cuda_device` on CUDA)."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available; set train.device=cpu (or auto)")
        return cuda_device(local_rank)
    return torch.device("cpu")


def build_mesh(dims: ParallelDims, device_type: str):
    """THE job's DeviceMesh: (dp_replicate, dp_shard, tp), tp fastest; size-1 dims kept so names always exist."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp), mesh_dim_names=MESH_DIMS)


def world_for(parallel: ParallelConfig | None = None, device: torch.device | str | None = None,
              dist_info: DistInfo | None = None, owns_group: bool = False) -> World:
    """The World of the current process group (one plain process without one) for the ``parallel`` section."""
    pcfg = parallel if parallel is not None else ParallelConfig()
    if not collectives.initialized():
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return World(dims=ParallelDims.from_config(pcfg, 1), device=dev)
    info = dist_info or current()
    rank, size = dist.get_rank(), dist.get_world_size()
    dev = torch.device(device) if device is not None else info.device
    dims = ParallelDims.from_config(pcfg, size)
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return World(rank, size, local_rank, dims, dev, build_mesh(dims, dev.type), info, owns_group)


def setup_world(device_pref: str = "auto", parallel: ParallelConfig | None = None) -> tuple[World, torch.device]:
    """Rank and world; under torchrun, join (create) the process group first (nccl on CUDA, gloo on CPU).

    ``parallel`` (the config's parallel section) sets the process-group timeout and the mesh. A group
    created here is destroyed when the process exits after its last run ended (`World.close`); one that
    already exists (an earlier run's, a test harness's) is used as it is. Returns (world, world.device).
    """
    pcfg = parallel if parallel is not None else ParallelConfig()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    info, owns = None, False
    if collectives.initialized():
        info = current()
    elif launched_by_torchrun():
        info, owns = init_distributed(pcfg.timeout_s, device=device.type), True
        destroy_at_exit(info)
    if info is not None:
        info.in_run = True  # until `World.close`
    world = world_for(pcfg, device, info, owns)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left (docs/guide/gpu.md)
    return world, device


# ---- the model ---------------------------------------------------------------------------------
def _parallel_cfg(cfg) -> ParallelConfig:
    """The config's ``parallel`` section (defaults when a recipe's config has none); train.compile folds in."""
    pcfg = getattr(cfg, "parallel", None)
    if not isinstance(pcfg, ParallelConfig):
        pcfg = ParallelConfig()
    train = getattr(cfg, "train", None)
    if getattr(train, "compile", False) and not pcfg.compile:
        pcfg = replace(pcfg, compile=True)
    return pcfg


def shards_parameters(world: World) -> bool:
    """Whether this job's parameters are DTensor shards (FSDP2/HSDP or tensor parallel) under a process group."""
    return world.distributed and (world.dims.data_parallel in ("fsdp", "hsdp") or world.dims.tp > 1)


def parallelize_model(model: nn.Module, cfg, world: World, device: torch.device) -> nn.Module:
    """THE parallelization hook: single-device model in, the model the training loop runs out (same object).

    A model built on the meta device (`build_for_world`) gets its weights here: after TP -> AC -> compile ->
    FSDP2 when its parameters end up sharded (each rank allocates and fills only its shards), before
    parallelizing otherwise (DDP broadcasts real weights; a single process just materializes).
    """

    pcfg = _parallel_cfg(cfg)
    precision = getattr(getattr(cfg, "train", None), "precision", None)
    on_meta = is_meta(model)
    source = weight_source(model)
    sharded = shards_parameters(world)
    if on_meta and source is not None and world.is_main:
        where = "each rank its shards" if sharded else "whole"
        info(f"model: {source.describe()} on the meta device, materialized {where}")
    if on_meta and not sharded:
        materialize(model, device)
    parallelize(model, pcfg, world, device=device, precision=precision)
    if on_meta and is_meta(model):
        materialize(model, device)
    return model


def build_for_world(mcfg, world: World, device: torch.device, *, seed: int | None = None, init: bool = True,
                    model_dir: str | None = None) -> nn.Module:
    """The recipe's model: full on ``device`` when one rank holds it all, on the meta device when the job
    shards parameters (`parallelize_model` then allocates and fills only each rank's shards).

    Weights: loaded from ``model_dir`` (each rank reads only its slices of the safetensors files), else the
    seeded init (``init``; bitwise the 1-process init), else left for a checkpoint load.
    """

    if not shards_parameters(world):
        if model_dir is not None:
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
    """Gradient reduction for one micro-batch of an accumulation (``skip``: not the last one).

    - FSDP2: reduce-scatter EVERY micro-batch (as torchtitan does), so each rank only ever holds its fp32
      gradient shard; skipping would keep every parameter's unsharded fp32 gradient on every rank until the
      last micro-batch (+4 bytes per parameter, which `lmforge.planner` does not budget). HSDP defers only
      the all-reduce across replicas (the reduce-scattered shards accumulate) to the last micro-batch.
    - DDP: skip the all-reduce on all but the last micro-batch (its gradients are full-size anyway).

    The flags are set (not restored on exit) because FSDP2 reads them during backward, which the trainer
    runs after this context.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync() if skip else contextlib.nullcontext()
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(not skip)  # only HSDP all-reduces; a no-op for 1-D FSDP2
        return contextlib.nullcontext()

    set_grad_sync(model, not skip)  # composable replicate (DDP)
    return contextlib.nullcontext()


def failure_guard(world: World):
    """`World.guard` as a function (`lmforge.tasks.run` wraps `Trainer.fit` in it)."""
    return world.guard()


def barrier() -> None:
    """Every rank of the job waits here (a no-op in a single process)."""
    collectives.barrier()
