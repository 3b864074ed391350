"""A key/value cache kept outside the model: preallocated per layer, filled by prefill and decode; and the
sizing of a server's paged cache (`lmforge.generate.paged`) from the memory it may take."""

from __future__ import annotations

import os

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


# ---- sizing ----------------------------------------------------------------------------------------
CPU_KV_CACHE_CAP_BYTES = 4 << 30  # a server's KV cache on the CPU by default: at most 4 GiB ...
CPU_AVAILABLE_FRACTION = 0.5  # ... and at most half the memory available now
CUDA_FREE_FRACTION = 0.8  # of the device's free memory after the model loaded; the rest: activations, allocator
MIN_DEFAULT_CONTEXT = 256  # a default context below this (or the model's own, when smaller) is refused


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Keys + values of one token over every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free on ``device`` now, in words): CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"the {free / 2**30:.1f} GiB free on {device}"
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = CPU_KV_CACHE_CAP_BYTES / CPU_AVAILABLE_FRACTION  # unknown: the cap decides
    return int(free), f"the {free / 2**30:.1f} GiB of memory available"


def kv_cache_budget(device: torch.device) -> tuple[int, str]:
    """(bytes a KV cache may take on ``device`` by default, where that figure comes from): on CUDA a fraction
    of the memory free now (after the model loaded), elsewhere a fixed cap or half the available memory."""
    free, where = available_memory(device)
    if device.type == "cuda":
        return int(free * CUDA_FREE_FRACTION), f"{CUDA_FREE_FRACTION:.0%} of {where}"
    if free * CPU_AVAILABLE_FRACTION < CPU_KV_CACHE_CAP_BYTES:
        return int(free * CPU_AVAILABLE_FRACTION), f"{CPU_AVAILABLE_FRACTION:.0%} of {where}"
    return CPU_KV_CACHE_CAP_BYTES, f"the {CPU_KV_CACHE_CAP_BYTES / 2**30:.0f} GiB cap on {device.type}"


def paged_cache_plan(cfg: ModelConfig, n_slots: int, max_context: int | None, kv_cache_gb: float | None,
                     block_size: int, device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
    """(tokens per sequence, blocks in the pool) of a server's paged KV cache, decided before anything is
    allocated.

    The context is ``max_context`` (capped at the model's max_seq_len), by default the model's own. The pool
    is ``kv_cache_gb`` when given (refused in one line when it is over the memory free now), else enough for
    ``n_slots`` sequences at that context within the default budget (`kv_cache_budget`); sequences take
    blocks as they grow, so the pool is shared, not split per slot. One sequence at the full context must
    fit: without ``max_context`` the context shrinks to the pool (never below 256 tokens or the model's
    own), with it the pair is refused.
    """
    device = torch.device(device)
    per_token = kv_bytes_per_token(cfg, dtype)
    per_block = per_token * block_size
    context = min(max_context or cfg.max_seq_len, cfg.max_seq_len)
    if kv_cache_gb is not None:
        free, where = available_memory(device)
        pool = int(kv_cache_gb * 2**30)
        if pool > free:
            raise UserError(f"--kv-cache-gb {kv_cache_gb:g} is over {where}; pass at most "
                            f"{free / 2**30:.1f}")
        where = f"--kv-cache-gb {kv_cache_gb:g}"
    else:
        budget, where = kv_cache_budget(device)
        pool = min(budget, n_slots * -(-context // block_size) * per_block)
    blocks = pool // per_block
    held = blocks * block_size
    if held < context:
        if max_context is not None or held < min(MIN_DEFAULT_CONTEXT, cfg.max_seq_len):
            raise UserError(f"a KV cache of {pool / 2**30:.2f} GiB ({where}) holds {held} tokens, less than "
                            f"one {context}-token sequence; pass a larger --kv-cache-gb or a smaller "
                            f"--max-context")
        context = held
    return int(context), int(blocks)
