"""A key/value cache kept outside the model: preallocated per layer, filled by prefill and decode."""

from __future__ import annotations

import torch

from lmforge.config import UserError
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

    Storage is (layers, slots, kv_heads, max_len, head_dim); a slot's token ``t`` lives at index ``t``.
    The model talks to a *view* (`prefill` / `decode`) with the `KVCache` interface (``update``,
    ``advance``, ``length``).
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_slots, self.max_len, self.window = n_slots, max_len, cfg.sliding_window
        self.lengths = [0] * n_slots  # tokens cached per slot

    def prefill(self, slot: int) -> _PrefillView:
        """A view that writes a whole prompt into ``slot`` from position 0 (the slot's old contents are dropped)."""
        self.lengths[slot] = 0
        return _PrefillView(self, slot)

    def decode(self, slots: list[int]) -> _DecodeView:
        """A view for one new token in each of ``slots`` (B = len(slots)); pass ``view.pos`` as the
        positions and ``view.key_mask`` (B, 1, 1, S) as the mask.

        Rows are read in place up to the longest (S = 1 + its cached tokens; a plain slice when the slots
        are consecutive, else one copy per layer) and shorter rows are masked past their own token. With a
        sliding window narrower than S the rows are instead gathered *right-aligned*, so that the new token
        sits at key index S-1 in every row and the model's window is measured from the right place.
        """
        return _DecodeView(self, slots)


class _PrefillView:
    def __init__(self, cache: SlotKVCache, slot: int):
        self.cache, self.slot, self.length = cache, slot, 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.size(2)  # k, v: (1, KV, T, d)
        if t > self.cache.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit the slot cache (max_len={self.cache.max_len})")
        self.cache.k[layer_idx, self.slot, :, :t] = k[0]
        self.cache.v[layer_idx, self.slot, :, :t] = v[0]
        return k, v

    def advance(self, t: int) -> None:
        self.cache.lengths[self.slot] = t


class _DecodeView:
    def __init__(self, cache: SlotKVCache, slots: list[int]):
        lengths = [cache.lengths[s] for s in slots]
        width = max(lengths) + 1  # S
        if width > cache.max_len:
            raise ValueError(f"KV cache is full: {width} tokens > max_len={cache.max_len}")
        dev = cache.k.device
        self.cache, self._slot_list = cache, slots
        self.slots = torch.tensor(slots, device=dev)
        self.pos = torch.tensor(lengths, device=dev)  # (B,) where each row's new token goes: its position
        self.length = width - 1  # what a model reading `cache.length` sees: S - 1 cached keys per row
        j = torch.arange(width, device=dev)
        self.right_aligned = cache.window is not None and width > cache.window
        if self.right_aligned:
            src = self.pos[:, None] - (width - 1) + j[None, :]  # (B, S): key j of row b is slot token src
            self.key_mask = (src >= 0)[:, None, None, :]
            self._rows, self._src = self.slots[:, None], src.clamp(min=0)
        else:
            self.key_mask = (j[None, :] <= self.pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
            first = slots[0]
            self._range = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) \
                else None
        self._width = width

    def _read(self, c: torch.Tensor) -> torch.Tensor:  # c: (slots, KV, max_len, d) -> (B, KV, S, d)
        if self.right_aligned:
            return c[self._rows, :, self._src].transpose(1, 2)  # advanced indices first: (B, S, KV, d)
        if self._range is not None:
            return c[self._range, :, : self._width]
        return c[:, :, : self._width].index_select(0, self.slots)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        ck[self.slots, :, self.pos] = k[:, :, 0]  # k: (B, KV, 1, d)
        cv[self.slots, :, self.pos] = v[:, :, 0]
        return self._read(ck), self._read(cv)

    def advance(self, t: int) -> None:
        for s in self._slot_list:
            self.cache.lengths[s] += t


# ---- sizing ----------------------------------------------------------------------------------------
CPU_KV_CACHE_CAP_BYTES = 4 << 30  # a server's KV cache on the CPU: at most 4 GiB unless --max-context asks
CUDA_FREE_FRACTION = 0.8  # of the device's free memory after the model loaded; the rest: activations, allocator
MIN_DEFAULT_CONTEXT = 256  # a default context below this (or the model's own, when smaller) is refused


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Keys + values of one token over every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_budget(device: torch.device) -> tuple[int, str]:
    """(bytes a KV cache may take on ``device``, where that figure comes from): on CUDA a fraction of the
    memory free now (after the model loaded), elsewhere a fixed cap."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_FRACTION), f"{CUDA_FREE_FRACTION:.0%} of the {free / 2**30:.1f} GiB free on {device}"
    return CPU_KV_CACHE_CAP_BYTES, f"the {CPU_KV_CACHE_CAP_BYTES / 2**30:.0f} GiB cap on {device.type}"


def slot_cache_context(cfg: ModelConfig, n_slots: int, requested: int | None, device: torch.device,
                       dtype: torch.dtype) -> int:
    """Tokens per slot of a `SlotKVCache` with ``n_slots`` slots: ``requested`` (capped at the model's
    max_seq_len) when it fits the budget, else a one-line refusal before anything is allocated; without a
    request, the longest context the budget holds — never the model's maximum by default alone (a
    131,072-token Llama 3.1 x 8 slots is 137 GB)."""
    per_token = kv_bytes_per_token(cfg, dtype) * n_slots
    budget, where = kv_cache_budget(torch.device(device))
    if requested is not None:
        context = min(requested, cfg.max_seq_len)
        if context * per_token > budget:
            raise UserError(f"a KV cache of {n_slots} slots x {context} tokens needs "
                            f"{context * per_token / 2**30:.1f} GiB, over {where}; lower --max-batch or "
                            f"--max-context (at most {budget // per_token} tokens at this batch)")
        return context
    context = min(cfg.max_seq_len, budget // per_token)
    if context < min(MIN_DEFAULT_CONTEXT, cfg.max_seq_len):
        raise UserError(f"a KV cache of {n_slots} slots holds only {context} tokens each within {where}; "
                        "lower --max-batch, or pass --max-context to choose the length")
    return int(context)
