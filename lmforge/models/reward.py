"""A reward model: the unchanged backbone plus one bias-free linear ``score`` (dim → 1) read at the last
real token — the layout of Hugging Face's ``*ForSequenceClassification`` with ``num_labels=1``.

Reward model dirs are written and read by `lmforge.artifacts.reward_dir` (also as a HF sequence
classifier).
"""

from __future__ import annotations

import torch
from torch import nn

TASK = "reward"


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg
        self.dropout = nn.Dropout(dropout)
        w = backbone.tok_embeddings.weight
        self.score = nn.Linear(backbone.cfg.dim, 1, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.normal_(self.score.weight, std=backbone.cfg.init_std)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,) real lengths -> scores (B,)."""
        B, T = tokens.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=tokens.device)
        h = self.backbone.hidden_states(tokens)  # (B, T, dim); causal: padding after a row never reaches it
        pooled = h[torch.arange(B, device=h.device), lengths - 1]  # (B, dim) the last real token
        return self.score(self.dropout(pooled)).squeeze(-1)


__all__ = ["TASK", "RewardModel"]
