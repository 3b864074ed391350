"""Spawned-rank jobs for the Trainer's RNG tests (imported by the children as "_trainer_jobs:NAME")."""

from __future__ import annotations

import json
from pathlib import Path

import _dist_harness as h
import torch


def _trainer(run_dir, data_dir, max_steps: int, parallel: dict, **sections):
    """The real Trainer over the token dir (as `_dist_harness.run_trainer`), returned before fit()."""
    from lmforge.data.loader import ShardLoader
    from lmforge.distributed.world import setup_world
    from lmforge.models.transformer import build_model
    from lmforge.train.trainer import Job, Trainer, find_resume

    cfg = h.trainer_config(run_dir, data_dir, max_steps, parallel, **sections)
    world, device = setup_world("cpu", cfg.parallel)
    mcfg = cfg.model_config()
    loader = ShardLoader(data_dir, "train", h.SEQ_T, h.BATCH_T, rank=world.dp_rank, world_size=world.dp_size, seed=0,
                         check_vocab=mcfg.vocab_size)
    record = world.tp_rank == 0
    job = Job(build_model(mcfg, seed=0), h.RecordingSource(loader, run_dir, world.rank, record), max_steps,
              math_fields={"model": h.MODELS_T_KEY})
    return Trainer(cfg, job, world, device=device, resume_from=find_resume(Path(run_dir), cfg.train.resume))


def _local_params(model) -> dict[str, torch.Tensor]:
    """This rank's piece of every parameter, with its placements ('plain' for a non-DTensor)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[name] = (str(p.placements), p.to_local().detach().clone())
        else:
            out[name] = ("plain", p.detach().clone())
    return out


def tp_dropout(info, run_dir: str, data_dir: str, steps: int, out: str, dropout: float = 0.2) -> None:
    """TP=2 with dropout: after every step, compare the replicated parameters across the TP peers."""
    import torch.distributed as dist

    trainer = _trainer(run_dir, data_dir, steps, {"tp": 2, "sequence_parallel": False, "timeout_s": 120},
                       model={"dropout": dropout},
                       checkpoint={"interval": 0, "at_end": False, "save_model": False})
    report = {"steps": [], "activations": [], "replicated": 0}
    original = trainer.train_step
    seen: list[torch.Tensor] = []

    def keep(module, inputs, output):  # the residual stream after block 0 (dropout applied): replicated
        seen.append((output.to_local() if hasattr(output, "to_local") else output).detach().clone())

    trainer.raw_model.layers[0].register_forward_hook(keep)

    def step_and_compare(batch):
        seen.clear()
        result = original(batch)
        mine = _local_params(trainer.model)
        both = [None, None]
        dist.all_gather_object(both, ({k: (pl, t) for k, (pl, t) in mine.items() if "Shard" not in pl}, seen))
        params = [b[0] for b in both]
        report["replicated"] = len(params[0])
        report["steps"].append(all(torch.equal(params[0][k][1], params[1][k][1]) for k in params[0]))
        acts = [b[1] for b in both]
        report["activations"].append(len(acts[0]) > 0 and all(torch.equal(a, b) for a, b in zip(*acts)))
        return result

    trainer.train_step = step_and_compare
    trainer.fit()
    if info.rank == 0:
        Path(out).write_text(json.dumps(report))


def dropout_masks(info, run_dir: str, data_dir: str, steps: int, parallel: dict, out: str) -> None:
    """Resume (or start) a dropout run; record one dropout mask drawn by every rank right after the start,
    and the data windows read (RecordingSource)."""
    import torch.distributed as dist

    trainer = _trainer(run_dir, data_dir, steps, {**parallel, "timeout_s": 120}, model={"dropout": 0.2},
                       checkpoint={"interval": 1, "keep_last": 10})
    masks = []
    original = trainer.train_step

    def step(batch):
        if not masks:  # the stream as the first step after the (re)start sees it
            state = torch.get_rng_state()
            masks.append(torch.nn.functional.dropout(torch.ones(64), 0.5).tolist())
            torch.set_rng_state(state)
        return original(batch)

    trainer.train_step = step
    trainer.fit()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, masks[0])
    if info.rank == 0:
        Path(out).write_text(json.dumps(gathered))


def pretrain_configs(info, configs: list[str]) -> None:
    """`lmforge.tasks.run` (the CLI's recipe) on each config in turn, on the spawned ranks."""
    import torch.distributed as dist

    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    for path in configs:
        run(load_config(path))
        dist.barrier()


def world_layout(info, out: str, layouts: dict) -> None:
    """Per layout: the real World's groups and meshes as global ranks, and a one-hot sum over its groups."""
    import torch.distributed as dist

    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import setup_world

    report = {}
    for name, spec in layouts.items():
        world, _ = setup_world("cpu", ParallelConfig(**spec))
        one_hot = torch.zeros(world.world_size)
        one_hot[world.rank] = 1.0
        everyone = one_hot.clone()
        report[name] = {
            "dp_rank": world.dp_rank, "tp_rank": world.tp_rank, "dp_size": world.dp_size,
            "tp_group": sorted(dist.get_process_group_ranks(world.tp_mesh.get_group())),
            "dp_group": sorted(dist.get_process_group_ranks(world.dp_group)),
            "ddp_group": sorted(dist.get_process_group_ranks(world.ddp_mesh.get_group())),
            "fsdp_mesh": world.fsdp_mesh.mesh.tolist(),
            "dp_sum": [int(v) for v in world.all_reduce_sum(one_hot)],
            "world_sum": [int(v) for v in world.all_reduce(everyone, "sum", over="world")],
        }
        world.close()  # the harness's group stays (it was not created by this World)
        assert dist.is_initialized()
    (Path(out) / f"layout_rank{info.rank}.json").write_text(json.dumps(report))


def fsdp_accumulation(info, run_dir: str, data_dir: str, steps: int, out: str) -> None:
    """The real Trainer with FSDP2 over 2 ranks and 2 micro-batches per rank and step: before each micro-batch
    (after the previous one's backward) record what gradient storage every parameter holds on this rank."""
    from torch.distributed.tensor import DTensor

    import lmforge.train.trainer as trainer_mod

    real, rows = trainer_mod.no_sync, []

    def recording(model, skip):
        grads = [(p, p.grad) for p in model.parameters()]
        rows.append({
            "skip": skip,
            "with_grad": sum(g is not None for _, g in grads), "params": len(grads),
            "all_dtensor": all(isinstance(g, DTensor) for _, g in grads if g is not None),
            "local_numel": sum(g.to_local().numel() for _, g in grads if isinstance(g, DTensor)),
            "global_numel": sum(p.numel() for p, _ in grads),
        })
        return real(model, skip)

    trainer_mod.no_sync = recording
    try:
        h.run_trainer(run_dir, data_dir, steps, {"dp_shard": 2, "timeout_s": 120})
    finally:
        trainer_mod.no_sync = real
    Path(out, f"grads_rank{info.rank}.json").write_text(json.dumps(rows))
