"""The Arcee family (``model_type: arcee``, ``ArceeForCausalLM``, Arcee AFM): the Llama decoder with a
non-gated squared-ReLU MLP, ``down_proj(relu(up_proj(x))²)``. This is what lmforge's ``activation: relu2``
computes (``w2(relu(w1 x)²)``), so a squared-ReLU model — the quickstart's — exports to it exactly, and
llama.cpp runs it as its ``arcee`` graph (see ``lmforge.artifacts.gguf``).

Everything else (RMSNorm, RoPE over whole heads, GQA, optional biases on every linear layer, Llama-3 RoPE
scaling, tied embeddings) is Llama's, so the translation is Llama's with the MLP swapped: ``w1`` is the
``up_proj`` here (in Llama it is the SwiGLU gate) and there is no ``w3``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.artifacts.hf.families import (
    _LLAMA_DEFAULTS,
    _LLAMA_MODULES,
    Family,
    _get,
    _llama_like_to_hf,
    _llama_like_to_lmforge,
    _llama_normalize,
    _require,
)
from lmforge.models.config import ModelConfig

ARCEE_MODULES = {k: v for k, v in _LLAMA_MODULES.items() if not k.startswith("layers.{i}.feed_forward.")}
ARCEE_MODULES.update({"layers.{i}.feed_forward.w1": "model.layers.{i}.mlp.up_proj",
                      "layers.{i}.feed_forward.w2": "model.layers.{i}.mlp.down_proj"})

# transformers' ArceeConfig class defaults (AFM-4.5B), for keys a config.json leaves out
ARCEE_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=32000, hidden_size=2560, intermediate_size=18432,
                      num_hidden_layers=32, num_attention_heads=32, hidden_act="relu2",
                      max_position_embeddings=4096, rms_norm_eps=1e-5)


def arcee_to_lmforge(hf: dict[str, Any]) -> dict[str, Any]:
    act = _get(hf, "hidden_act", ARCEE_DEFAULTS)
    _require(act == "relu2", f"arcee: hidden_act='{act}' is not supported; lmforge's non-gated MLP for Arcee is "
                             "relu2 (squared ReLU)")
    fields = _llama_like_to_lmforge({**hf, "hidden_act": "silu"}, ARCEE_DEFAULTS, "arcee")
    fields["activation"] = "relu2"
    return fields


def arcee_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _require(cfg.causal and cfg.lm_head and cfg.pos_encoding == "rope" and cfg.activation == "relu2"
             and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and not cfg.embedding_norm
             and not cfg.type_vocab_size and not cfg.embed_scale and cfg.final_norm,
             "this model's shape has no arcee equivalent; arcee needs a causal pre-norm RMSNorm/RoPE decoder with "
             "a squared-ReLU (relu2) MLP and an LM head")
    _require(not cfg.qkv_bias or cfg.bias, "arcee has no q/k/v-only bias; train with model.qkv_bias=false to export")
    _require(cfg.sliding_window is None, "arcee has no sliding window; train with model.sliding_window unset "
                                         "to export")
    # Llama's fields for the same shape (the SwiGLU stand-in only gets through Llama's activation check;
    # the MLP's width and activation are set right below)
    out = _llama_like_to_hf(dataclasses.replace(cfg, activation="swiglu", ffn_hidden=cfg.hidden_dim), "arcee")
    out.update(intermediate_size=cfg.hidden_dim, hidden_act="relu2", attention_bias=cfg.bias, mlp_bias=cfg.bias)
    # ArceeConfig's class defaults are AFM's Llama-3 token ids (128000 / 128001), outside a small vocabulary:
    # the ids come from the exported tokenizer (``tokenizer_files`` fills them) or stay unset.
    out.update(bos_token_id=None, eos_token_id=None)
    return out


ARCEE = Family("arcee", "arcee", ("ArceeForCausalLM",), ARCEE_MODULES, arcee_to_lmforge, arcee_to_hf,
               _llama_normalize, defaults=ARCEE_DEFAULTS)

__all__ = ["ARCEE", "ARCEE_DEFAULTS", "ARCEE_MODULES", "arcee_to_hf", "arcee_to_lmforge"]
