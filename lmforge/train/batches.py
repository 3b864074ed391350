"""What the training loop does with a batch: micro-batch splitting, device moves, and how many input tokens
a batch feeds the forward pass (the throughput count). The losses are in `lmforge.train.losses`."""

from __future__ import annotations

from typing import Any

import torch


def input_tokens(batch: Any) -> int:
    """Input positions of a batch that hold a real token (what the forward pass processes).

    Causal rows (B, T+1) feed T inputs; a dict may say it explicitly: ``input_tokens`` (B,) per row
    (SFT), ``lengths`` (B,) (classification); otherwise every position of ``tokens`` (B, T+1) but the last.
    """
    return int(count_input_tokens(batch))


def count_input_tokens(batch: Any) -> torch.Tensor | int:
    """`input_tokens` without reading a device value back: a 0-d tensor where the count lives in one (the
    training loop sums these on the device and synchronizes once per step), else a Python int."""
    if isinstance(batch, dict):
        for key in ("input_tokens", "lengths"):
            if torch.is_tensor(batch.get(key)):
                return batch[key].sum()
        batch = batch["tokens"]
    return int(batch.size(0) * (batch.size(1) - 1)) if batch.dim() == 2 else int(batch.numel())


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

