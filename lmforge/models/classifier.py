"""Sequence classification (sentiment, topic): a pooled head on any lmforge backbone.

Injected, not forked: `SequenceClassifier` holds the unchanged `Transformer` as ``backbone`` and adds
``score`` (dim → labels). Classifier model dirs are written and read by `lmforge.artifacts.classifier_dir`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lmforge.config import UserError

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
