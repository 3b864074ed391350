"""The one entry point of every training run: config -> task -> checks -> world -> data -> resume -> model ->
`Trainer.fit()` -> the task's outputs (RUN/model, RUN/adapter) -> the trackers' end of run.

    result = run(cfg)          # cfg: a PretrainConfig or a FinetuneConfig, validated
    line, payload = summary(result)

The task (`lmforge.tasks.registry`) decides everything that differs between ways of training; this module
holds only their common order. Every check that can fail on the user's input runs before a model is built.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.distributed.world import barrier, failure_guard, setup_world
from lmforge.tasks.base import RunResult
from lmforge.tasks.registry import TASKS, task_for
from lmforge.train.config import grad_accum_steps
from lmforge.train.resume import check_compatible, find_resume
from lmforge.train.trainer import Trainer


def run(cfg, config_path: str | None = None) -> RunResult:
    """Run (or resume) the training ``cfg`` selects; returns the Trainer's result and the task's outputs.
    ``config_path`` (the recipe file) is accepted for callers that pass it; the config already holds its effect."""
    task = task_for(cfg)
    task.check()  # no work yet
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world, device = setup_world(cfg.train.device, cfg.parallel)
    grad_accum_steps(cfg.global_batch_size, cfg.train.micro_batch, world.dp_size)
    resume_from = find_resume(task.run_dir, cfg.train.resume)  # a path or None: decided once, here
    task.prepare(world, device)
    total_steps = task.total_steps()
    fields = task.math_fields()
    notes = [] if resume_from is None else check_compatible(resume_from, fields, cfg.checkpoint.allow_mismatch)
    model = task.build_model(world, device, resume_from)
    task.describe(model, world, device, total_steps, resume_from)
    barrier()
    job = task.job(model, world, device, total_steps)
    trainer = Trainer(task.trainer_cfg(), job, world, device=device, resume_from=resume_from, resume_notes=notes)
    with failure_guard(world):  # a rank that fails or dies makes the others exit, naming it
        result = trainer.fit()
    outputs = task.save_outputs(trainer, result)
    trainer.trackers.finish_run(result.stop_reason, outputs.model_dir, outputs.adapter_dir)  # log.mlflow / wandb
    world.close()  # the run ended: a process group lmforge created is destroyed at exit (not after a failure)
    return task.result(result, outputs, model)


def summary(res: RunResult) -> tuple[str, dict[str, Any]]:
    """The one-line CLI summary and the --json payload of a run, as its task writes them."""
    return TASKS[res.mode].summary(res)


__all__ = ["RunResult", "run", "summary"]
