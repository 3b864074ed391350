"""Every mode a config can select runs a registered task, and the task's summary is its own."""

import typing

import pytest

from lmforge.config import ConfigError
from lmforge.tasks.base import Task
from lmforge.tasks.config import MODE_SPECS, FinetuneConfig, FinetuneSection
from lmforge.tasks.registry import TASKS, task_for
from lmforge.train.config import TrainConfig


def test_every_selectable_mode_has_a_task():
    modes = set(typing.get_args(typing.get_type_hints(FinetuneSection)["mode"]))
    objectives = set(typing.get_args(typing.get_type_hints(TrainConfig)["objective"]))
    assert modes == set(MODE_SPECS)
    assert modes | objectives == set(TASKS)
    assert all(issubclass(cls, Task) for cls in TASKS.values())


def test_an_unknown_task_name_is_refused_in_one_line():
    cfg = FinetuneConfig()
    cfg.finetune.mode = "rlhf"  # past the config's own check: the registry still names the known tasks
    with pytest.raises(ConfigError, match="no task 'rlhf'; known: clm, mlm, sft, lora, classify, dpo, reward"):
        task_for(cfg)
