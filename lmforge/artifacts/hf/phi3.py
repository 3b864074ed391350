"""The Phi-3 family (``Phi3ForCausalLM``: Phi-3 / Phi-3.5 mini and medium, 4k contexts): the Llama computation
with fused projections — ``self_attn.qkv_proj`` holds the rows of q, k and v, ``mlp.gate_up_proj`` those of
gate (w1) and up (w3) — split into lmforge's separate linears on import and concatenated back on export (bit for
bit). Registered in `lmforge.artifacts.hf.families.FAMILIES` by importing this module (`lmforge.artifacts.hf`
does). The 128k variants' ``longrope`` scaling and a ``partial_rotary_factor`` below 1 (Phi-4-mini) are refused
by the shared RoPE reader.
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

PHI3_MODULES = {**_LLAMA_MODULES,
                "layers.{i}.attention.wq": ("model.layers.{i}.self_attn.qkv_proj", ("fused", 0, "linear")),
                "layers.{i}.attention.wk": ("model.layers.{i}.self_attn.qkv_proj", ("fused", 1, "linear")),
                "layers.{i}.attention.wv": ("model.layers.{i}.self_attn.qkv_proj", ("fused", 2, "linear")),
                "layers.{i}.feed_forward.w1": ("model.layers.{i}.mlp.gate_up_proj", ("fused", 0, "linear", "gate_up")),
                "layers.{i}.feed_forward.w3": ("model.layers.{i}.mlp.gate_up_proj", ("fused", 1, "linear", "gate_up"))}
# transformers' Phi3Config class defaults (for keys a config.json leaves out)
PHI3_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, sliding_window=None)


def phi3_to_lmforge(hf: dict[str, Any]) -> dict[str, Any]:
    fields = _llama_like_to_lmforge(hf, PHI3_DEFAULTS, "phi3")
    _require(not fields["bias"], "phi3: biased projections are not supported")
    fields["sliding_window"] = hf.get("sliding_window")  # Phi-3 mini 4k: 2047, on every layer
    fields["dropout"] = float(hf.get("attention_dropout") or 0.0)
    return fields


def phi3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _require(not cfg.bias and not cfg.qkv_bias, "phi3 has no biases; export this model as llama or qwen2")
    out = _llama_like_to_hf(cfg, "phi3")
    out.update(sliding_window=cfg.sliding_window, original_max_position_embeddings=cfg.max_seq_len,
               resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout)
    return out


PHI3 = Family("phi3", "phi3", ("Phi3ForCausalLM",), PHI3_MODULES, phi3_to_lmforge, phi3_to_hf, _llama_normalize,
              defaults=PHI3_DEFAULTS)
FAMILIES.setdefault("phi3", PHI3)

__all__ = ["PHI3", "PHI3_DEFAULTS", "PHI3_MODULES", "phi3_to_hf", "phi3_to_lmforge"]
