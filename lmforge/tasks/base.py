"""The `Task` protocol: what one way of training supplies to the shared run (`lmforge.tasks.run.run`).

A task is built from its validated config and is asked, in this order:

    check()                                  everything that can fail on the user's input, before any work
    prepare(world, device)                   read, encode and batch its data (train batches, validation)
    total_steps()                            optimizer steps of the run
    math_fields()                            the settings that change its math (a resume refuses to mix them)
    build_model(world, device, resume_from)  the model to train: built, loaded, wrapped (LoRA is an option of
                                             the model that the shared fine-tuning code applies, not a task)
    describe(model, world, device, ...)      the run's first lines on stderr (rank 0)
    job(model, world, device)                the Trainer's `Job`: batches, ``loss``, evaluation (``val_batches``
                                             / ``eval_fn``), FLOPs per token, bytes per token, RUN/model writer
    save_outputs(trainer, result)            RUN/model, RUN/adapter, RUN/best at the end -> `Outputs`
    summary(result)                          the one-line CLI summary and the --json payload

``unit`` names what the loss counts (tokens, examples, pairs) for the logs and the summary.
Adding a task means one module with a `Task` subclass and one line in `lmforge.tasks.registry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from lmforge.train.report import format_duration
from lmforge.train.trainer import Job, TrainResult


@dataclass
class Outputs:
    """What a task wrote at the end of a run."""

    model_dir: str | None = None
    adapter_dir: str | None = None
    weights_step: int | None = None  # the step whose weights RUN/model holds (the best one with eval.keep_best)


@dataclass
class RunResult:
    """The result of `lmforge.tasks.run.run`: the Trainer's result and what the task made of it."""

    mode: str  # the task's name as the config spells it (clm | mlm | sft | lora | classify | dpo | reward | grpo)
    train: TrainResult
    model_dir: str | None = None
    adapter_dir: str | None = None
    weights_step: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    n_train: int = 0
    n_dev: int = 0
    labels: list[str] | None = None
    majority_baseline: float | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)


class Task:
    """The base of every task; see the module docstring for the order of the hooks."""

    name: ClassVar[str] = ""  # the registry name
    unit: ClassVar[str] = "tokens"  # what ``loss_tokens`` counts

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self._val = None  # set by prepare(): the validation set, as `val_batches` returns it
        self._eval = None  # set by prepare() or job(): the extra evaluation, as `eval_fn` returns it

    # ---- before any work ------------------------------------------------------------------------
    def check(self) -> None:
        """Checks of the user's input that need files but no work (model dir, data index, vocabulary)."""

    # ---- data -------------------------------------------------------------------------------------
    def prepare(self, world, device) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        raise NotImplementedError

    def math_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    # ---- model and loss ---------------------------------------------------------------------------
    def build_model(self, world, device, resume_from: Path | None) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module):
        """``loss(model, batch) -> (loss_sum, n_targets)`` for the Trainer (`lmforge.train.losses`)."""
        raise NotImplementedError

    def flops_per_token(self) -> float | None:
        """Training FLOPs per input token for MFU; None: not reported."""
        return None

    def val_batches(self):
        """A callable returning the whole validation set (the Trainer shares it out), or None."""
        return self._val

    def eval_fn(self):
        """``eval_fn(model) -> {metric: value}`` for every evaluation, or None."""
        return self._eval

    def describe(self, model: nn.Module, world, device, total_steps: int, resume_from: Path | None) -> None:
        """The run's first lines on stderr (rank 0)."""

    def job(self, model: nn.Module, world, device, total_steps: int) -> Job:
        raise NotImplementedError

    def trainer_cfg(self):
        """The config the Trainer runs with."""
        return self.cfg

    # ---- the end ----------------------------------------------------------------------------------
    def save_outputs(self, trainer, result: TrainResult) -> Outputs:
        return Outputs(result.model_dir, None, result.step if result.model_dir else None)

    def result(self, train: TrainResult, outputs: Outputs, model: nn.Module) -> RunResult:
        n = sum(p.numel() for p in model.parameters())
        return RunResult(self.name, train, outputs.model_dir, outputs.adapter_dir, outputs.weights_step, n, n)

    @classmethod
    def summary(cls, res: RunResult) -> tuple[str, dict[str, Any]]:
        """The one-line CLI summary and the --json payload (a class method: it reads only ``res``)."""
        raise NotImplementedError


def stopped_at(r: TrainResult, seen: str) -> str:
    """``max steps at step 1,000 (… tokens) in 1m2s`` — how every summary line starts."""
    reason = r.signal if r.stop_reason == "signal" and r.signal else r.stop_reason
    return f"{reason.replace('_', ' ')} at step {r.step:,} ({seen}) in {format_duration(r.elapsed_s)}"


def final_loss(r: TrainResult) -> list[str]:
    return [f"loss {r.final_loss:.4f}"] if r.final_loss is not None and math.isfinite(r.final_loss) else []


__all__ = ["Job", "Outputs", "RunResult", "Task", "final_loss", "stopped_at"]
