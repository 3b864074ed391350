"""Spawned-rank jobs for test_muon_dist.py (imported by the children as "_muon_worker:NAME")."""

from __future__ import annotations

import json
from pathlib import Path

import _dist_harness as h
import torch


def jobs_then_count(info, jobs: list[dict], count_out: str) -> None:
    """The real-Trainer jobs, then `count_newton_schulz` on the same ranks (one spawn for both)."""
    h.run_trainer_jobs(info, jobs)
    count_newton_schulz(info, count_out)


def count_newton_schulz(info, out: str) -> None:
    """One Muon step of an FSDP2-sharded tiny model per `muon_ns_work`: how many matrices (and FLOPs)
    each rank orthogonalized."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import world_for
    from lmforge.models.transformer import build_model
    from lmforge.train import muon
    from lmforge.train.config import OptimConfig
    from lmforge.train.optim import build_optimizer

    pcfg = ParallelConfig(dp_shard=info.world_size)
    model = build_model(h.model_config("tiny"), seed=0)
    parallelize(model, pcfg, world_for(pcfg, info.device), device=info.device)
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():  # the same full gradient on every rank, sliced like the parameter
        full = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None) \
            if isinstance(p, DTensor) else full
    report = {}
    original = muon.newton_schulz
    for work in ("split", "replicate"):
        calls: list[tuple[int, ...]] = []
        muon.newton_schulz = _counting(original, calls)
        try:
            build_optimizer(model, OptimConfig(name="muon", muon_ns_work=work)).step()
        finally:
            muon.newton_schulz = original
        mine = {"matrices": len(calls), "flops": sum(muon.ns_flops(s, 5) for s in calls)}
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
        report[work] = every
    if info.rank == 0:
        Path(out).write_text(json.dumps(report))


def _counting(fn, calls: list):
    def counted(g, *args, **kwargs):
        calls.append(tuple(g.shape))
        return fn(g, *args, **kwargs)

    return counted
