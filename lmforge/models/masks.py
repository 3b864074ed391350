"""Attention masks as one pure function: causality (offset by cached keys), a sliding window and the
caller's padding / document mask folded into what `scaled_dot_product_attention` takes.

Conventions: a mask is bool, True = the query may attend to the key. Queries are the last ``q_len`` of
``k_len`` positions (a KV cache holds the first ``k_len - q_len``), so query ``t`` sits at key index
``k_len - q_len + t``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepMask(NamedTuple):
    """What `attention_mask` returned for one forward pass, handed to every layer as is (built once, not
    per layer): ``attn_mask`` (bool, broadcastable to (B, H, T, S), or None) and ``is_causal``."""

    attn_mask: torch.Tensor | None
    is_causal: bool


def attention_mask(q_len: int, k_len: int, *, causal: bool = True, window: int | None = None,
                   mask: torch.Tensor | None = None, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for SDPA.

    causal:  query ``t`` sees keys ``s <= k_len - q_len + t`` (ignored for encoders: ``causal=False``);
    window:  and only the last ``window`` of those: ``s > k_len - q_len + t - window`` (Mistral);
    mask:    the caller's bool mask, broadcastable to (B, H, q_len, k_len) (padding, documents), and-ed in.

    The common case — causal, no cache, no caller mask, window not binding — returns ``(None, True)`` so
    SDPA takes its fused causal kernel; every other case returns one explicit bool mask and ``False``.
    """
    if not causal:
        return mask, False
    if k_len == q_len and mask is None and (window is None or k_len <= window):
        return None, True
    offset = k_len - q_len
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=offset)  # (T, S)
    if window is not None:
        allowed = allowed.triu(diagonal=offset - window + 1)
    allowed = allowed[None, None]  # (1, 1, T, S)
    return (allowed if mask is None else mask & allowed), False


def materialize(attn_mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int) -> torch.Tensor:
    """The full bool mask an ``(attn_mask, is_causal)`` pair stands for (SDPA's top-left causal
    alignment for ``is_causal``); for tests and debugging."""
    full = torch.ones(1, 1, q_len, k_len, dtype=torch.bool)
    if is_causal:
        full = full & torch.ones(q_len, k_len, dtype=torch.bool).tril()
    if attn_mask is not None:
        full = full & attn_mask.to(torch.bool).cpu()
    return full
