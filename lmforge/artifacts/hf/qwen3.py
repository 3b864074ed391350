"""The Qwen3 family (``Qwen3ForCausalLM``): the Llama layout plus an RMSNorm over each head of q and k before
RoPE (``self_attn.q_norm`` / ``k_norm``, one weight of width ``head_dim`` shared by the heads), which is
lmforge's ``model.qk_norm``. Registered in `lmforge.artifacts.hf.families.FAMILIES` by importing this module
(`lmforge.artifacts.hf` does).

Qwen3 with ``attention_bias=true`` puts biases on q/k/v/o but not the MLP, and ``use_sliding_window=true``
applies a window to some layers only: lmforge expresses neither, so both are refused (no released Qwen3
checkpoint uses them).
"""

from __future__ import annotations

from typing import Any

from lmforge.artifacts.hf.families import (
    _LLAMA_DEFAULTS,
    _LLAMA_MODULES,
    FAMILIES,
    Family,
    _llama_like_to_hf,
    _llama_like_to_lmforge,
    _llama_normalize,
    _require,
)
from lmforge.models.config import ModelConfig

QWEN3_MODULES = {**_LLAMA_MODULES,
                 "layers.{i}.attention.q_norm": "model.layers.{i}.self_attn.q_norm",
                 "layers.{i}.attention.k_norm": "model.layers.{i}.self_attn.k_norm"}
# transformers' Qwen3Config class defaults (for keys a config.json leaves out)
QWEN3_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                      head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6)


def qwen3_to_lmforge(hf: dict[str, Any]) -> dict[str, Any]:
    _require(not hf.get("attention_bias", False),
             "qwen3: attention_bias=true (biases on q/k/v/o, none in the MLP) is not supported; lmforge puts biases "
             "on every linear layer, on q/k/v only, or on none")
    _require(not hf.get("use_sliding_window", False),
             "qwen3: use_sliding_window=true is not supported (Qwen3 applies it to some layers only); lmforge "
             "supports full attention for Qwen3")
    fields = _llama_like_to_lmforge(hf, QWEN3_DEFAULTS, "qwen3")
    fields["head_dim"] = int(hf.get("head_dim") or QWEN3_DEFAULTS["head_dim"])
    fields["qk_norm"] = True
    return fields


def qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg.qk_norm, "qwen3 normalizes q and k (model.qk_norm=true); export this model as llama, mistral or "
                          "qwen2")
    _require(not cfg.bias and not cfg.qkv_bias, "qwen3 export has no biases; export this model as llama or qwen2")
    _require(cfg.sliding_window is None, "qwen3 export supports full attention only (model.sliding_window unset)")
    out = _llama_like_to_hf(cfg, "qwen3")
    out.update(attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


QWEN3 = Family("qwen3", "qwen3", ("Qwen3ForCausalLM",), QWEN3_MODULES, qwen3_to_lmforge, qwen3_to_hf,
               _llama_normalize, defaults=QWEN3_DEFAULTS)
FAMILIES.setdefault("qwen3", QWEN3)

__all__ = ["QWEN3", "QWEN3_DEFAULTS", "QWEN3_MODULES", "qwen3_to_hf", "qwen3_to_lmforge"]
