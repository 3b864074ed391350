"""Sequence classification (sentiment, topic): a pooled head on any lmforge backbone.

Injected, not forked: `SequenceClassifier` holds the unchanged `Transformer` as ``backbone`` and adds
``score`` (dim → labels). A classifier model dir is a normal model dir whose config.json also holds
``task: classify``, ``labels`` and ``pooling``; its weights are the backbone's keys plus ``score.*``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lmforge.atomic import atomic_directory
from lmforge.config import UserError, to_dict

Pooling = Literal["last", "mean", "first"]


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, n_labels: int, pooling: Pooling = "last", dropout: float = 0.0):
        super().__init__()
        if n_labels < 2:
            raise UserError(f"classification needs at least 2 labels, got {n_labels}; check data.label_field")
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        dev = backbone.tok_embeddings.weight.device
        dt = backbone.tok_embeddings.weight.dtype
        self.score = nn.Linear(backbone.cfg.dim, n_labels, device=dev, dtype=dt)
        with torch.no_grad():
            nn.init.normal_(self.score.weight, std=backbone.cfg.init_std)
            self.score.bias.zero_()

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,) real lengths -> logits (B, labels)."""
        B, T = tokens.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=tokens.device)
        valid = torch.arange(T, device=tokens.device)[None, :] < lengths[:, None]  # (B, T)
        mask = None
        if not self.cfg.causal and not bool(valid.all()):
            mask = valid[:, None, None, :]  # encoder: hide right padding from every query
        h = self.backbone.hidden_states(tokens, mask=mask)  # (B, T, dim)
        if self.pooling == "last":  # causal LMs: the last real token has seen the whole text
            pooled = h[torch.arange(B, device=h.device), lengths - 1]
        elif self.pooling == "first":  # BERT's [CLS]
            pooled = h[:, 0]
        else:
            w = valid.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return self.score(self.dropout(pooled))


def save_classifier_dir(clf: SequenceClassifier, directory: str | os.PathLike, labels: list[str],
                        tokenizer_dir: str | None = None, extra: dict | None = None) -> Path:
    from lmforge.models.model_dir import CONFIG_NAME, copy_tokenizer_files, save_weights, unique_state_dict

    with atomic_directory(directory) as tmp:
        sd = unique_state_dict(clf.backbone)
        sd.update({f"score.{k}": v for k, v in clf.score.state_dict().items()})
        (tmp / CONFIG_NAME).write_text(json.dumps(
            {"model": to_dict(clf.cfg), "task": "classify", "labels": list(labels), "pooling": clf.pooling,
             **(extra or {})},
            indent=2, ensure_ascii=False))
        save_weights(sd, tmp)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(directory)


def read_task(directory: str | os.PathLike) -> dict:
    """The task fields of a model dir's config.json ({} for a plain LM); ``max_tokens``: the length texts
    were cut to when the classifier was fine-tuned."""
    path = Path(directory) / "config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {k: data[k] for k in ("task", "labels", "pooling", "max_tokens") if k in data}


def load_classifier_dir(directory: str | os.PathLike, device="cpu", dtype=torch.float32) -> tuple[SequenceClassifier, list[str]]:
    from lmforge.models.model_dir import load_state_strict, load_weights, read_config
    from lmforge.models.transformer import build_model

    task = read_task(directory)
    if task.get("task") != "classify":
        raise UserError(f"'{directory}' is not a classifier model dir (config.json has no task: classify); "
                        "fine-tune one with finetune.mode=classify")
    cfg = read_config(directory)
    backbone = build_model(cfg, device=device, dtype=dtype, init=False)
    clf = SequenceClassifier(backbone, len(task["labels"]), task.get("pooling", "last"))
    sd = load_weights(directory)
    score = {k[len("score."):]: sd.pop(k) for k in list(sd) if k.startswith("score.")}
    load_state_strict(backbone, sd, directory)
    clf.score.load_state_dict(score)
    return clf.to(device), list(task["labels"])
