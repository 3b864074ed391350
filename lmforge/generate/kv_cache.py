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


class SlotKVCache:
    """Keys and values for a fixed number of independent sequences ("slots"), each with its own length,
    for continuous batching: a request takes a free slot, is prefilled alone, then decodes one token per
    step together with whatever other slots are active; leaving frees the slot for the next request.

    Storage is (layers, slots, max_len, kv_heads, head_dim); a slot's token ``t`` lives at index ``t``.
    The model talks to a *view* (`prefill` / `decode`) with the `KVCache` interface (``update``,
    ``advance``, ``length``).
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, n_slots, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots, self.max_len = n_slots, max_len
        self.lengths = [0] * n_slots  # tokens cached per slot

    def prefill(self, slot: int) -> _PrefillView:
        """A view that writes a whole prompt into ``slot`` from position 0 (the slot's old contents are dropped)."""
        self.lengths[slot] = 0
        return _PrefillView(self, slot)

    def decode(self, slots: list[int]) -> _DecodeView:
        """A view for one new token in each of ``slots`` (B = len(slots)).

        Each row's keys come back *right-aligned* to a common width S = 1 + the longest cached slot: the
        new token sits at key index S-1 in every row, so the model's causal / sliding-window mask is right
        for all rows; ``view.key_mask`` (B, 1, 1, S) hides the left padding of shorter rows.
        """
        return _DecodeView(self, slots)


class _PrefillView:
    def __init__(self, cache: SlotKVCache, slot: int):
        self.cache, self.slot, self.length = cache, slot, 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)  # k, v: (1, KV, T, d)
        if t > self.cache.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the slot cache (max_len={self.cache.max_len})")
        self.cache.k[layer_idx, self.slot, :t] = k[0].transpose(0, 1)  # (T, KV, d)
        self.cache.v[layer_idx, self.slot, :t] = v[0].transpose(0, 1)
        return k, v

    def advance(self, t: int) -> None:
        self.cache.lengths[self.slot] = t


class _DecodeView:
    def __init__(self, cache: SlotKVCache, slots: list[int]):
        lengths = [cache.lengths[s] for s in slots]
        if max(lengths) + 1 > cache.max_len:
            raise ValueError(f"KV cache is full: {max(lengths) + 1} tokens > max_len={cache.max_len}")
        dev = cache.k.device
        self.cache = cache
        self.slots = torch.tensor(slots, device=dev)
        self.pos = torch.tensor(lengths, device=dev)  # where each row's new token goes
        width = max(lengths) + 1
        self.length = width - 1  # what a model that reads `cache.length` sees: S - 1 cached keys per row
        j = torch.arange(width, device=dev)
        src = self.pos[:, None] - (width - 1) + j[None, :]  # (B, S): key index j of row b reads slot token src
        self.key_mask = (src >= 0)[:, None, None, :]  # (B, 1, 1, S)
        self._rows = self.slots[:, None]
        self._src = src.clamp(min=0)
        self._slot_list = slots

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (slots, max_len, KV, d)
        ck[self.slots, self.pos] = k[:, :, 0]  # k: (B, KV, 1, d)
        cv[self.slots, self.pos] = v[:, :, 0]
        # gather right-aligned rows: (B, S, KV, d) -> (B, KV, S, d)
        return ck[self._rows, self._src].transpose(1, 2), cv[self._rows, self._src].transpose(1, 2)

    def advance(self, t: int) -> None:
        for s in self._slot_list:
            self.cache.lengths[s] += t
