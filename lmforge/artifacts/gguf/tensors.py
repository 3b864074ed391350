"""lmforge tensors → GGUF tensors: llama.cpp's names, its q/k row order, and the storage type of each.

RoPE layout: lmforge (like Hugging Face) rotates the two halves of each head, ``(x_i, x_{i+d/2})``; the
``llama`` graph of llama.cpp rotates adjacent pairs ``(x_{2i}, x_{2i+1})`` (``LLAMA_ROPE_TYPE_NORM``). So, as
llama.cpp's own ``convert_hf_to_gguf.py`` does, the rows of ``wq`` / ``wk`` (and their biases) are
reordered per head from ``[0 .. d/2-1 | d/2 .. d-1]`` to ``[0, d/2, 1, d/2+1, …]``: the dot products,
hence the logits, are unchanged (the ``arcee`` graph rotates like ``llama``). The ``qwen2`` and ``qwen3``
graphs rotate halves (``NEOX``) and take the rows as they are.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.positional import rope_inv_freq

# lmforge module -> llama.cpp tensor name; the same in the llama and qwen2 graphs.
_NAMES = {
    "tok_embeddings": "token_embd",
    "norm": "output_norm",
    "output": "output",
    "layers.{i}.attention_norm": "blk.{i}.attn_norm",
    "layers.{i}.attention.wq": "blk.{i}.attn_q",
    "layers.{i}.attention.wk": "blk.{i}.attn_k",
    "layers.{i}.attention.wv": "blk.{i}.attn_v",
    "layers.{i}.attention.wo": "blk.{i}.attn_output",
    "layers.{i}.attention.q_norm": "blk.{i}.attn_q_norm",  # qwen3 graph only
    "layers.{i}.attention.k_norm": "blk.{i}.attn_k_norm",
    "layers.{i}.ffn_norm": "blk.{i}.ffn_norm",
    "layers.{i}.feed_forward.w1": "blk.{i}.ffn_gate",
    "layers.{i}.feed_forward.w3": "blk.{i}.ffn_up",
    "layers.{i}.feed_forward.w2": "blk.{i}.ffn_down",
}
# llama.cpp's ``arcee`` graph (the squared-ReLU Llama): a non-gated MLP, ffn_down(relu(ffn_up x)²), so the
# relu2 MLP's w1 is the up projection there (in the llama graph w1 is the SwiGLU gate).
_ARCEE_NAMES = {**_NAMES, "layers.{i}.feed_forward.w1": "blk.{i}.ffn_up"}
del _ARCEE_NAMES["layers.{i}.feed_forward.w3"]
Q8_BLOCK = 32  # values per q8_0 block (one f16 scale + 32 int8)


def gguf_name(lm_key: str, arch: str = "llama") -> str:
    """``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight`` (``arch``: the GGUF graph)."""
    names = _ARCEE_NAMES if arch == "arcee" else _NAMES
    module, _, param = lm_key.rpartition(".")
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    template = f"layers.{{i}}.{m.group(2)}" if m else module
    if template not in names:
        raise UserError(f"lmforge tensor '{lm_key}' has no GGUF (llama.cpp) equivalent; GGUF export supports "
                        "Llama / Mistral / Qwen2-shaped decoders")
    return f"{names[template].format(i=m.group(1) if m else '')}.{param}"


def halves_to_pairs(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from the half-split RoPE layout to llama.cpp's interleaved pairs.
    ``t``: (n_heads * head_dim, ...) weight or (n_heads * head_dim,) bias."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def pairs_to_halves(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`halves_to_pairs` (what a GGUF reader undoes)."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def to_gguf_layout(lm_key: str, t: torch.Tensor, cfg: ModelConfig, permute_qk: bool) -> torch.Tensor:
    if permute_qk and ".attention.wq." in lm_key:
        return halves_to_pairs(t, cfg.n_heads)
    if permute_qk and ".attention.wk." in lm_key:
        return halves_to_pairs(t, cfg.n_kv_heads)
    return t


def encode(t: torch.Tensor, dtype: str):
    """(numpy array, raw GGML type or None) for ``t`` stored as ``dtype`` (f32 | f16 | q8_0).

    As llama.cpp does: 1-D tensors (norms, biases) stay f32, and a q8_0 matrix whose rows do not fill
    whole 32-value blocks falls back to f16."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or dtype == "f32":
        return np.ascontiguousarray(a, dtype=np.float32), None
    if dtype == "f16" or a.shape[-1] % Q8_BLOCK:
        return a.astype(np.float16), None
    return quantize(a, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0


def rope_freq_factors(cfg: ModelConfig) -> torch.Tensor | None:
    """llama.cpp's ``rope_freqs.weight`` for Llama-3 RoPE scaling: per frequency, the divisor of the base
    frequency (``theta_i / factor_i`` = lmforge's scaled inverse frequency). None without scaling."""
    if cfg.rope_scaling is None:
        return None
    base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (base / rope_inv_freq(cfg)).to(torch.float32)
