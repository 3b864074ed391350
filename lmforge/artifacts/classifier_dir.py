"""Classifier model dirs: a normal model dir whose metadata says ``task: classify`` with its ``labels``,
``pooling`` and ``max_tokens``; its weights are the backbone's keys plus ``score.*``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import load_state_strict, load_weights, unique_state_dict, write_model_dir
from lmforge.config import UserError
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.transformer import build_model


def save_classifier_dir(clf: SequenceClassifier, directory: str | os.PathLike, labels: list[str],
                        tokenizer_dir: str | None = None, extra: dict | None = None) -> Path:
    """``extra``: provenance, and ``max_tokens`` / ``tokenizer_hash`` (stored in the metadata block)."""
    sd = unique_state_dict(clf.backbone)
    sd.update({f"score.{k}": v for k, v in clf.score.state_dict().items()})
    return write_model_dir(directory, clf.cfg, sd, tokenizer_dir, task="classify", extra=extra,
                           labels=list(labels), pooling=clf.pooling)


def read_task(directory: str | os.PathLike) -> dict[str, Any]:
    """The task fields of a model dir (task, labels, pooling, max_tokens: the length texts were cut to
    when the classifier was fine-tuned); {} for a dir without a config.json."""
    if not (Path(directory) / "config.json").is_file():
        return {}
    return read_metadata(directory).task_fields()


def load_classifier_dir(directory: str | os.PathLike, device="cpu", dtype=torch.float32
                        ) -> tuple[SequenceClassifier, list[str]]:
    info = read_metadata(directory)
    if info.kind != "model" or info.task != "classify":
        raise UserError(f"'{directory}' is not a classifier model dir (its metadata has no task: classify); "
                        "fine-tune one with finetune.mode=classify")
    backbone = build_model(info.model_config(), device=device, dtype=dtype, init=False)
    clf = SequenceClassifier(backbone, len(info.labels), info.pooling or "last")
    sd = load_weights(directory)
    score = {k[len("score."):]: sd.pop(k) for k in list(sd) if k.startswith("score.")}
    load_state_strict(backbone, sd, directory)
    missing, unexpected = clf.score.load_state_dict(score, strict=False)
    if missing or unexpected:
        raise UserError(f"the classifier head in '{directory}' does not match its {len(info.labels)} labels: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}; re-export the classifier dir")
    return clf.to(device), list(info.labels)


__all__ = ["load_classifier_dir", "read_task", "save_classifier_dir"]
