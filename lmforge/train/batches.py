"""What the training loop does with a batch: the causal-LM loss, micro-batch splitting, device moves, and
how many input tokens a batch feeds the forward pass (the throughput count)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def input_tokens(batch: Any) -> int:
    """Input positions of a batch that hold a real token (what the forward pass processes).

    Causal rows (B, T+1) feed T inputs; a dict may say it explicitly: ``input_tokens`` (B,) per row
    (SFT), ``lengths`` (B,) (classification); otherwise every position of ``tokens`` (B, T+1) but the last.
    """
    if isinstance(batch, dict):
        for key in ("input_tokens", "lengths"):
            if torch.is_tensor(batch.get(key)):
                return int(batch[key].sum())
        batch = batch["tokens"]
    return int(batch.size(0) * (batch.size(1) - 1)) if batch.dim() == 2 else int(batch.numel())


def causal_lm_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed. batch: tokens (B, T+1), or a dict with ``tokens`` and optional
    ``mask`` (bool (B, 1, T, T)), ``positions`` (B, T) and ``labels`` (B, T+1; -100 = not a target)."""
    mask = positions = labels = None
    if isinstance(batch, dict):
        tokens, mask, positions, labels = batch["tokens"], batch.get("mask"), batch.get("positions"), batch.get("labels")
    else:
        tokens = batch
    inputs = tokens[:, :-1]  # (B, T)
    targets = (labels if labels is not None else tokens)[:, 1:]  # (B, T)
    logits = model(inputs, positions=positions, mask=mask)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=-100)
    return loss, (targets != -100).sum()


def split_micro(batch: Any, micro: int) -> list[Any]:
    """Cut a step's batch into micro-batches of ``micro`` rows (tensors or dicts of tensors)."""
    if isinstance(batch, dict):
        n = next(iter(v for v in batch.values() if torch.is_tensor(v))).size(0)
        return [{k: (v[i:i + micro] if torch.is_tensor(v) and v.dim() and v.size(0) == n else v)
                 for k, v in batch.items()} for i in range(0, n, micro)]
    return list(batch.split(micro, dim=0))


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
