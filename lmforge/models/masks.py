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
    mask:    the caller's bool mask, broadcastable to (B, H, q_len, k_len) (padding, documents), and-ed in;
             a FlexAttention ``BlockMask`` (`document_block_mask`) is returned as is (it holds causality).

    The common case — causal, no cache, no caller mask, window not binding — returns ``(None, True)`` so
    SDPA takes its fused causal kernel; every other case returns one explicit bool mask and ``False``.
    """
    if is_block_mask(mask):  # a FlexAttention BlockMask carries causality and the window itself
        return mask, False
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


# ---- document masks (packed sequences) -------------------------------------------------------------
# A packed row holds several documents; a query attends only to keys of its own document. The caller
# hands over the document ids (B, T) (``doc_ids[b, t]`` equal iff same document; padding -1 attends to
# padding only) and the mask is built where they live — on the GPU after the batch moved there — never as
# a dense (B, 1, T, T) host tensor copied per micro-batch:
#   * CUDA: a FlexAttention ``BlockMask`` (causality, window and documents in one ``mask_mod``, built
#     blockwise by a compiled kernel; attention then runs the compiled flex kernel, which skips the blocks
#     the mask rules out instead of forcing SDPA off its fused kernels);
#   * elsewhere (CPU; torch without FlexAttention): the dense bool mask, built on the ids' device.
def document_mask_dense(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) doc ids -> bool (B, 1, T, T), True where query and key are in the same document (on the
    ids' device; causality is added by `attention_mask`)."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def is_block_mask(mask) -> bool:
    if mask is None or isinstance(mask, torch.Tensor):
        return False
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:
        return False
    return isinstance(mask, BlockMask)


def _document_mask_mod(doc_ids: torch.Tensor, causal: bool, window: int | None):
    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc_ids[b, q_idx] == doc_ids[b, kv_idx]
        if causal:
            keep = keep & (q_idx >= kv_idx)
            if window is not None:
                keep = keep & (q_idx - kv_idx < window)
        return keep

    return mask_mod


def document_block_mask(doc_ids: torch.Tensor, *, causal: bool = True, window: int | None = None,
                        compile: bool | None = None):
    """(B, T) doc ids -> a FlexAttention ``BlockMask`` for self-attention over the T positions, causality
    and the sliding window included (it replaces `attention_mask`'s output whole). ``compile`` (default:
    on CUDA) builds it blockwise with a compiled kernel; eager evaluates the full (B, T, T) grid once."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape
    compile = doc_ids.device.type == "cuda" if compile is None else compile
    mod = _document_mask_mod(doc_ids, causal, window)
    try:
        return create_block_mask(mod, B, None, T, T, device=doc_ids.device, _compile=compile)
    except TypeError as e:  # a torch without the private ``_compile`` switch: compile the builder itself
        if "_compile" not in str(e):
            raise
        build = torch.compile(create_block_mask) if compile else create_block_mask
        return build(mod, B, None, T, T, device=doc_ids.device)


def dense_from_block_mask(block_mask, n_heads: int = 1) -> torch.Tensor:
    """The bool (B, 1, T, S) mask a ``BlockMask`` stands for (the reference kernel; tests)."""
    from torch.nn.attention.flex_attention import create_mask

    B = block_mask.kv_num_blocks.size(0)
    q_len, kv_len = block_mask.seq_lengths
    return create_mask(block_mask.mask_mod, B, 1, q_len, kv_len, device=block_mask.kv_num_blocks.device)


_COMPILED_FLEX = None


def flex_attention_forward(q, k, v, block_mask, dropout_p: float = 0.0):
    """FlexAttention of q (B, H, T, d), k / v (B, KV, S, d) under ``block_mask``; compiled on CUDA (eager
    FlexAttention materializes the scores: fine for CPU tests, not for training)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if dropout_p:
        raise ValueError("attention dropout is not supported with document masks on CUDA (FlexAttention); "
                         "set model.dropout=0 or data.doc_mask=false")
    gqa = q.size(1) != k.size(1)
    if q.device.type == "cuda":
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    import warnings

    with warnings.catch_warnings():  # eager off CUDA is the intended path here (tests, CPU parity)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def document_attention_mask(doc_ids: torch.Tensor, *, causal: bool = True, window: int | None = None,
                            use_flex: bool | None = None):
    """What the model takes as ``mask=`` for packed documents: a ``BlockMask`` on CUDA (``use_flex``
    default) where FlexAttention exists, else the dense (B, 1, T, T) bool mask on the ids' device."""
    if use_flex is None:
        use_flex = doc_ids.device.type == "cuda" and flex_available()
    if use_flex:
        return document_block_mask(doc_ids, causal=causal, window=window)
    return document_mask_dense(doc_ids)
