"""Tiny random `transformers` models built locally (never downloaded) for the HF parity tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

import torch

V = 128  # vocabulary of every tiny model

_ROPE_L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
_SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2)

# name -> (config class, model class, config kwargs): every family, GQA and MHA, tied and untied,
# RoPE scaling on and off, biases, sliding window.
CASES = {
    "llama-mha-untied": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL, num_key_value_heads=4)),
    "llama3-gqa-tied-ropescaling": ("LlamaConfig", "LlamaForCausalLM",
                                    dict(_SMALL, num_key_value_heads=2, tie_word_embeddings=True,
                                         rope_scaling=_ROPE_L3, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama-bias-headdim": ("LlamaConfig", "LlamaForCausalLM",
                           dict(_SMALL, num_key_value_heads=1, attention_bias=True, mlp_bias=True, head_dim=32)),
    "mistral-gqa-window": ("MistralConfig", "MistralForCausalLM",
                           dict(_SMALL, num_key_value_heads=2, sliding_window=7)),
    "qwen2-gqa-qkvbias": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, num_key_value_heads=2)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen3-gqa-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, num_key_value_heads=2, head_dim=32)),
    "phi3-gqa-fused": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, num_key_value_heads=2, pad_token_id=0)),
    "phi3-window-tied": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, num_key_value_heads=4, sliding_window=7,
                                                              tie_word_embeddings=True, pad_token_id=0)),
    "gpt2-tied": ("GPT2Config", "GPT2LMHeadModel",
                  dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)),
    "gpt2-untied-gelu": ("GPT2Config", "GPT2LMHeadModel",
                         dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=96,
                              activation_function="gelu", tie_word_embeddings=False, bos_token_id=1,
                              eos_token_id=2)),
}
DECODER_CASES = list(CASES)

BERT_KW = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=64, type_vocab_size=2)


def make_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    cfg_cls, model_cls, kw = CASES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    _perturb_norms(model, seed)
    return model.to(dtype)


def make_bert(cls_name: str = "BertModel", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**{**BERT_KW, **kw})).eval()
    _perturb_norms(model, seed)
    return model


@torch.no_grad()
def _perturb_norms(model, seed: int) -> None:
    """Fresh models have unit norm weights and zero biases, which hides a swapped or dropped tensor;
    give every parameter a distinct random value."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


