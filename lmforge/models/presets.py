"""Named model shapes, from a 1M-parameter test model to 13B. Counts are pinned by tests."""

from __future__ import annotations

import dataclasses
from typing import Any

from lmforge.config import ConfigError, from_dict, to_dict
from lmforge.models.config import ModelConfig, RopeScaling

_LLAMA = dict(activation="swiglu", norm="rmsnorm", pos_encoding="rope", tie_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: unit tests and CI.
    "tiny": dict(_LLAMA, vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=384,
                 max_seq_len=256, tie_embeddings=True, norm_eps=1e-5),
    # ~8M parameters: the quickstart model, minutes on a laptop CPU.
    "small": dict(_LLAMA, vocab_size=8192, dim=288, n_layers=6, n_heads=6, ffn_hidden=768,
                  max_seq_len=512, tie_embeddings=True),
    # Vaswani et al. (2017) base shape as a decoder: sinusoidal positions, ReLU FFN, post-norm.
    "transformer-base": dict(vocab_size=37000, dim=512, n_layers=6, n_heads=8, ffn_hidden=2048,
                             activation="relu", norm="layernorm", norm_position="post",
                             pos_encoding="sinusoidal", embed_scale=True, bias=True, dropout=0.1,
                             tie_embeddings=True, max_seq_len=512),
    "gpt2-124m": dict(vocab_size=50257, dim=768, n_layers=12, n_heads=12, ffn_hidden=3072,
                      activation="gelu_tanh", norm="layernorm", pos_encoding="learned", bias=True,
                      tie_embeddings=True, max_seq_len=1024),
    "bert-base": dict(vocab_size=30522, dim=768, n_layers=12, n_heads=12, ffn_hidden=3072,
                      activation="gelu", norm="layernorm", norm_eps=1e-12, norm_position="post",
                      pos_encoding="learned", bias=True, causal=False, embedding_norm=True,
                      type_vocab_size=2, lm_head=False, dropout=0.1, max_seq_len=512),
    "llama-7b": dict(_LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008,
                     norm_eps=1e-6, max_seq_len=2048),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_hidden=11008,
                      norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(_LLAMA, vocab_size=32000, dim=5120, n_layers=40, n_heads=40, ffn_hidden=13824,
                       norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b": dict(_LLAMA, vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      ffn_hidden=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": dict(_LLAMA, vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        ffn_hidden=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072,
                        rope_scaling=to_dict(RopeScaling())),
    "mistral-7b": dict(_LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       ffn_hidden=14336, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=8192),
    "qwen2.5-7b": dict(_LLAMA, vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                       ffn_hidden=18944, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                       max_seq_len=32768),
    # Qwen3: QK-norm, head_dim 128 independent of dim (lmforge.artifacts.hf.qwen3).
    "qwen3-0.6b": dict(_LLAMA, vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       ffn_hidden=3072, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, tie_embeddings=True,
                       max_seq_len=40960),
    "qwen3-8b": dict(_LLAMA, vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
                     ffn_hidden=12288, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, max_seq_len=40960),
    # Phi-3-mini-4k: the Llama computation (fused qkv / gate_up in HF, lmforge.artifacts.hf.phi3), window 2047.
    "phi3-mini": dict(_LLAMA, vocab_size=32064, dim=3072, n_layers=32, n_heads=32, ffn_hidden=8192, norm_eps=1e-5,
                      sliding_window=2047, max_seq_len=4096),
}

# Figures published by the model authors (model cards / papers), held exactly by tests.
PUBLISHED_PARAMS = {
    "llama-7b": 6_738_415_616,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,  # "0.6B" on the model card; the exact count of transformers' Qwen3ForCausalLM
    "qwen3-8b": 8_190_735_360,  # "8.2B"
    "phi3-mini": 3_821_079_552,  # "3.8B"; transformers' Phi3ForCausalLM
    "gpt2-124m": 124_439_808,
    "bert-base": 108_891_648,  # BertModel without the pooler (109,482,240 with it)
}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset's ModelConfig, with field overrides validated like any config."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; choose one of {', '.join(PRESETS)}"
        raise ConfigError(f"unknown model preset '{name}'{hint}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides}, prefix="model")


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """``{"preset": "small", "dim": 320, ...}`` or a full field dict -> ModelConfig."""
    data = dict(data)
    preset = data.pop("preset", None)
    if preset:
        return get_preset(preset, **data)
    return from_dict(ModelConfig, data, prefix="model")


def replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return from_dict(ModelConfig, {**to_dict(cfg), **changes}, prefix="model")


def describe(name: str, seq_len: int | None = None) -> dict[str, Any]:
    cfg = get_preset(name)
    return {
        "name": name,
        "params": cfg.num_params(),
        "flops_per_token": cfg.flops_per_token(seq_len),
        "seq_len": seq_len or cfg.max_seq_len,
        "layers": cfg.n_layers,
        "dim": cfg.dim,
        "heads": cfg.n_heads,
        "kv_heads": cfg.n_kv_heads,
        "ffn_hidden": cfg.hidden_dim,
        "vocab_size": cfg.vocab_size,
        "pos_encoding": cfg.pos_encoding,
        "activation": cfg.activation,
        "causal": cfg.causal,
        "published_params": PUBLISHED_PARAMS.get(name),
    }


__all__ = ["PRESETS", "PUBLISHED_PARAMS", "get_preset", "preset_names", "describe", "replace",
           "model_config_from_dict", "dataclasses"]
