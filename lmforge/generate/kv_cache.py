"""A key/value cache kept outside the model: preallocated per layer, filled by prefill and decode."""

from __future__ import annotations

import torch

from lmforge.models.config import ModelConfig


class KVCache:
    """Keys and values of every layer for a batch: (layers, B, kv_heads, max_len, head_dim).

    The model writes each layer's new keys/values at ``length`` and reads back [0, length + T);
    after the last layer it calls ``advance(T)``.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > max_len={self.max_len}; allocate a longer cache")
        self.k[layer_idx, :, :, self.length:end] = k
        self.v[layer_idx, :, :, self.length:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.length = 0
