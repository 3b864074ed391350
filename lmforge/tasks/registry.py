"""Every task by the name its config selects (``train.objective`` of a pretraining config, ``finetune.mode``
of a fine-tuning config). Adding a task: one module with a `lmforge.tasks.base.Task` subclass and one line
here."""

from __future__ import annotations

from lmforge.config import ConfigError
from lmforge.tasks.base import Task
from lmforge.tasks.classify import ClassifyTask
from lmforge.tasks.config import FinetuneConfig
from lmforge.tasks.grpo import GRPOTask
from lmforge.tasks.mlm import MLMTask
from lmforge.tasks.preference import PreferenceTask
from lmforge.tasks.pretrain import PretrainTask
from lmforge.tasks.reward import RewardTask
from lmforge.tasks.sft import SFTTask
from lmforge.train.config import PretrainConfig

TASKS: dict[str, type[Task]] = {
    "clm": PretrainTask,  # train.objective: clm
    "mlm": MLMTask,  # train.objective: mlm
    "sft": SFTTask,  # finetune.mode: sft
    "lora": SFTTask,  # finetune.mode: lora (SFT with LoRA adapters)
    "classify": ClassifyTask,
    "dpo": PreferenceTask,
    "reward": RewardTask,
    "grpo": GRPOTask,  # finetune.mode: grpo (online RL with verifiable rewards)
}


def task_name(cfg) -> str:
    """The registry name a config selects."""
    if isinstance(cfg, FinetuneConfig):
        return cfg.finetune.mode
    if isinstance(cfg, PretrainConfig):
        return cfg.train.objective
    raise TypeError(f"no task for a {type(cfg).__name__}")


def task_for(cfg) -> Task:
    """The task object for a validated config."""
    name = task_name(cfg)
    if name not in TASKS:
        raise ConfigError(f"no task '{name}'; known: {', '.join(TASKS)}")
    return TASKS[name](cfg)


__all__ = ["TASKS", "task_for", "task_name"]
