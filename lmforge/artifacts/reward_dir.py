"""Reward model dirs: a normal model dir whose metadata says ``task: reward``; its weights are the
backbone's keys plus ``score.weight``. `lmforge.artifacts.hf.convert.export_reward_hf` writes one as a HF
sequence classifier."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import (
    load_state_strict,
    load_weights,
    unique_state_dict,
    write_model_dir,
)
from lmforge.config import UserError
from lmforge.models.reward import TASK, RewardModel
from lmforge.models.transformer import build_model


def save_reward_dir(model: RewardModel, directory: str | os.PathLike, tokenizer_dir: str | None = None,
                    extra: dict | None = None) -> Path:
    sd = unique_state_dict(model.backbone)
    sd["score.weight"] = model.score.weight.detach()
    return write_model_dir(directory, model.cfg, sd, tokenizer_dir, task=TASK, extra=extra, pooling="last")


def is_reward_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / "config.json").is_file() and read_metadata(d).task == TASK


def load_reward_dir(directory: str | os.PathLike, device="cpu", dtype=torch.float32) -> RewardModel:
    if not is_reward_dir(directory):
        raise UserError(f"'{directory}' is not a reward model dir (its metadata has no task: reward); train one "
                        "with finetune.mode=reward")
    cfg = read_metadata(directory).model_config()
    model = RewardModel(build_model(cfg, device=device, dtype=dtype, init=False))
    sd = load_weights(directory)
    score = sd.pop("score.weight", None)
    if score is None:
        raise UserError(f"'{directory}' holds no score.weight; the reward model dir is incomplete")
    load_state_strict(model.backbone, sd, directory)
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.to(device).eval()


__all__ = ["is_reward_dir", "load_reward_dir", "save_reward_dir"]
