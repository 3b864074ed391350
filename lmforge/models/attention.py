"""Attention kernels: softmax(Q Kᵀ / √d) V, fused (`sdpa_attention`, the one training uses) or written
out (`reference_attention`, which tests hold the fused one to). A model picks its kernel once, at
construction; `use_attention_kernel` swaps it afterwards (tests select the reference this way).

Shapes: q (B, H, T, d), k / v (B, KV, S, d) with H a multiple of KV (grouped-query attention),
mask bool broadcastable to (B, H, T, S), True = may attend, or a FlexAttention ``BlockMask`` (packed
documents on CUDA, `lmforge.models.masks.document_block_mask`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.masks import dense_from_block_mask, flex_attention_forward, is_block_mask


def sdpa_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    if is_block_mask(mask):  # packed documents on CUDA: FlexAttention (`lmforge.models.masks`)
        return flex_attention_forward(q, k, v, mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          enable_gqa=q.size(1) != k.size(1))  # (B, H, T, d)


def reference_attention(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """softmax(Q Kᵀ / √d_k) V, written out (``is_causal``: SDPA's top-left aligned causal mask)."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, d)
    d_k = q.size(-1)
    if is_block_mask(mask):
        mask = dense_from_block_mask(mask)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (B, H, T, S)
    if is_causal:
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, d)


KERNELS = {"sdpa": sdpa_attention, "reference": reference_attention}


def use_attention_kernel(model: nn.Module, name: str) -> nn.Module:
    """Make every attention layer of ``model`` use kernel ``name`` ("sdpa" | "reference")."""
    if name not in KERNELS:
        raise ValueError(f"attention kernel '{name}' is not one of {', '.join(KERNELS)}")
    for m in model.modules():
        if hasattr(m, "kernel") and callable(m.kernel):
            m.kernel = KERNELS[name]
    return model
