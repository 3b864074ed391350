"""Per-family translation between Hugging Face ``config.json`` / state-dict keys and lmforge's.

A family is data: the HF ``model_type`` and architectures, a templated module-name map
(``layers.{i}.attention.wq`` ↔ ``model.layers.{i}.self_attn.q_proj``), how each HF tensor is laid out
(``linear``, GPT-2's transposed ``conv1d``, a slice of a fused QKV), which HF keys are buffers to drop, and
two config functions. No torch here: `lmforge.artifacts.hf.convert` moves the tensors.

RoPE: lmforge rotates the two halves of each head (the GPT-NeoX / HF layout), so HF Llama-family q/k
weights load as they are; only Meta's original interleaved checkpoints would need the q/k permutation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import UserError, from_dict, to_dict
from lmforge.models.config import ModelConfig, RopeScaling

# --------------------------------------------------------------------------------------------------
# Key maps. Values: (hf module template, layout). layout: "linear" (same as nn.Linear / nn.Embedding /
# norms), "conv1d" (GPT-2 Conv1D: weight stored (in, out)), ("fused", part, "conv1d") for one of q/k/v
# inside GPT-2's c_attn.
# --------------------------------------------------------------------------------------------------
_LLAMA_MODULES = {
    "tok_embeddings": "model.embed_tokens",
    "layers.{i}.attention.wq": "model.layers.{i}.self_attn.q_proj",
    "layers.{i}.attention.wk": "model.layers.{i}.self_attn.k_proj",
    "layers.{i}.attention.wv": "model.layers.{i}.self_attn.v_proj",
    "layers.{i}.attention.wo": "model.layers.{i}.self_attn.o_proj",
    "layers.{i}.feed_forward.w1": "model.layers.{i}.mlp.gate_proj",
    "layers.{i}.feed_forward.w3": "model.layers.{i}.mlp.up_proj",
    "layers.{i}.feed_forward.w2": "model.layers.{i}.mlp.down_proj",
    "layers.{i}.attention_norm": "model.layers.{i}.input_layernorm",
    "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "norm": "model.norm",
    "output": "lm_head",
}

_GPT2_MODULES = {
    "tok_embeddings": "transformer.wte",
    "pos_embeddings": "transformer.wpe",
    "layers.{i}.attention_norm": "transformer.h.{i}.ln_1",
    "layers.{i}.attention.wq": ("transformer.h.{i}.attn.c_attn", ("fused", 0, "conv1d")),
    "layers.{i}.attention.wk": ("transformer.h.{i}.attn.c_attn", ("fused", 1, "conv1d")),
    "layers.{i}.attention.wv": ("transformer.h.{i}.attn.c_attn", ("fused", 2, "conv1d")),
    "layers.{i}.attention.wo": ("transformer.h.{i}.attn.c_proj", "conv1d"),
    "layers.{i}.ffn_norm": "transformer.h.{i}.ln_2",
    "layers.{i}.feed_forward.w1": ("transformer.h.{i}.mlp.c_fc", "conv1d"),
    "layers.{i}.feed_forward.w2": ("transformer.h.{i}.mlp.c_proj", "conv1d"),
    "norm": "transformer.ln_f",
    "output": "lm_head",
}

_BERT_MODULES = {
    "tok_embeddings": "embeddings.word_embeddings",
    "pos_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embedding_norm": "embeddings.LayerNorm",
    "layers.{i}.attention.wq": "encoder.layer.{i}.attention.self.query",
    "layers.{i}.attention.wk": "encoder.layer.{i}.attention.self.key",
    "layers.{i}.attention.wv": "encoder.layer.{i}.attention.self.value",
    "layers.{i}.attention.wo": "encoder.layer.{i}.attention.output.dense",
    "layers.{i}.attention_norm": "encoder.layer.{i}.attention.output.LayerNorm",
    "layers.{i}.feed_forward.w1": "encoder.layer.{i}.intermediate.dense",
    "layers.{i}.feed_forward.w2": "encoder.layer.{i}.output.dense",
    "layers.{i}.ffn_norm": "encoder.layer.{i}.output.LayerNorm",
}

# Heads kept beside the backbone (lmforge.models.heads): lmforge key -> HF key (exact names).
_BERT_HEAD_KEYS = {
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
}


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    architectures: tuple[str, ...]  # accepted on import; the first is the default on export
    modules: dict[str, Any]
    to_lmforge: Callable[[dict[str, Any]], dict[str, Any]]  # HF config -> ModelConfig fields
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> HF config fields
    normalize_key: Callable[[str], str | None]  # checkpoint key -> canonical HF key (None = drop)
    head_keys: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)  # transformers' class defaults for absent keys

    def module_entry(self, lm_module: str) -> tuple[str, Any] | None:
        """lmforge module name -> (HF module name, layout) via the templates, or None."""
        m = re.match(r"^layers\.(\d+)\.(.+)$", lm_module)
        template, i = (f"layers.{{i}}.{m.group(2)}", m.group(1)) if m else (lm_module, None)
        entry = self.modules.get(template)
        if entry is None:
            return None
        hf, layout = (entry, "linear") if isinstance(entry, str) else entry
        return (hf.format(i=i) if i is not None else hf), layout


def _get(hf: dict[str, Any], key: str, fam_defaults: dict[str, Any]) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    return fam_defaults.get(key)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


# ---- RoPE -----------------------------------------------------------------------------------------
def _rope_from_hf(hf: dict[str, Any], default_theta: float) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either layout: v4's ``rope_theta`` + ``rope_scaling`` or v5's ``rope_parameters``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    spec = params if params.get("rope_type") not in (None, "default") else scaling
    rope_type = spec.get("rope_type", spec.get("type")) if spec else None
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    _require(partial in (None, 1, 1.0), f"partial_rotary_factor={partial} is not supported; lmforge rotates whole heads")
    if rope_type in (None, "default"):
        return float(theta), None
    _require(rope_type in ("llama3", "yarn", "dynamic"),
             f"rope scaling type '{rope_type}' is not supported; lmforge implements the Llama-3 ('llama3'), YaRN "
             "('yarn') and dynamic NTK ('dynamic') scalings")
    if rope_type == "dynamic":  # transformers grows the base beyond max_position_embeddings (the original context)
        _require(hf.get("max_position_embeddings") is not None and spec.get("factor") is not None,
                 "dynamic rope scaling needs factor and max_position_embeddings in config.json")
        return float(theta), RopeScaling(type="dynamic", factor=float(spec["factor"]),
                                         original_max_seq_len=int(hf["max_position_embeddings"]))
    if rope_type == "yarn":
        _require(not spec.get("mscale") and not spec.get("mscale_all_dim"),
                 "yarn rope scaling with mscale / mscale_all_dim (DeepSeek's variant) is not supported")
        _require(spec.get("factor") is not None and spec.get("original_max_position_embeddings") is not None,
                 "yarn rope scaling needs factor and original_max_position_embeddings")
        af = spec.get("attention_factor")
        return float(theta), RopeScaling(
            type="yarn", factor=float(spec["factor"]), original_max_seq_len=int(spec["original_max_position_embeddings"]),
            beta_fast=float(spec.get("beta_fast") or 32), beta_slow=float(spec.get("beta_slow") or 1),
            attention_factor=float(af) if af is not None else None,
            truncate=bool(params.get("truncate", scaling.get("truncate", True))))
    return float(theta), RopeScaling(factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                                     high_freq_factor=float(spec["high_freq_factor"]),
                                     original_max_seq_len=int(spec["original_max_position_embeddings"]))


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """v4 layout (``rope_theta`` + ``rope_scaling``): read by every transformers release and by converters."""
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_scaling": None}
    if cfg.rope_scaling is not None and cfg.rope_scaling.type == "dynamic":
        _require(cfg.rope_scaling.original_max_seq_len == cfg.max_seq_len,
                 "dynamic rope scaling grows beyond max_position_embeddings in transformers: export needs "
                 "model.rope_scaling.original_max_seq_len equal to model.max_seq_len")
        out["rope_scaling"] = {"rope_type": "dynamic", "factor": cfg.rope_scaling.factor}
    elif cfg.rope_scaling is not None and cfg.rope_scaling.type == "yarn":
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings":
                               s.original_max_seq_len, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}
        if s.attention_factor is not None:
            out["rope_scaling"]["attention_factor"] = s.attention_factor
        if not s.truncate:
            out["rope_scaling"]["truncate"] = False
    elif cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_seq_len}
    return out


# ---- Llama / Mistral / Qwen2 ------------------------------------------------------------------------
def _llama_like_to_lmforge(hf: dict[str, Any], d: dict[str, Any], family: str) -> dict[str, Any]:
    act = _get(hf, "hidden_act", d)
    _require(act == "silu", f"{family}: hidden_act='{act}' is not supported; lmforge's SwiGLU uses silu")
    heads = int(_get(hf, "num_attention_heads", d))
    dim = int(_get(hf, "hidden_size", d))
    theta, scaling = _rope_from_hf(hf, d["rope_theta"])
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    qkv_bias = family == "qwen2"
    _require(attn_bias == mlp_bias or qkv_bias,
             f"{family}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported; lmforge puts biases "
             "on every linear layer or on none (or on q/k/v only, Qwen2)")
    fields = dict(
        vocab_size=int(_get(hf, "vocab_size", d)), dim=dim, n_layers=int(_get(hf, "num_hidden_layers", d)),
        n_heads=heads, n_kv_heads=int(_get(hf, "num_key_value_heads", d) or heads),
        head_dim=int(hf.get("head_dim") or dim // heads), ffn_hidden=int(_get(hf, "intermediate_size", d)),
        activation="swiglu", norm="rmsnorm", norm_eps=float(_get(hf, "rms_norm_eps", d)), pos_encoding="rope",
        rope_theta=theta, rope_scaling=scaling, max_seq_len=int(_get(hf, "max_position_embeddings", d)),
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", d)), bias=attn_bias and not qkv_bias,
        qkv_bias=qkv_bias, dropout=float(hf.get("attention_dropout") or 0.0),
        init_std=float(_get(hf, "initializer_range", d)),
    )
    if family == "mistral":
        fields["sliding_window"] = hf.get("sliding_window", d.get("sliding_window"))
    if family == "qwen2":
        _require(not hf.get("use_sliding_window", False),
                 "qwen2: use_sliding_window=true is not supported (Qwen2 applies it to some layers only); "
                 "lmforge supports full attention for Qwen2")
    return fields


def _llama_like_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    _require(cfg.causal and cfg.lm_head and cfg.pos_encoding == "rope" and cfg.activation == "swiglu"
             and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and not cfg.embedding_norm
             and not cfg.type_vocab_size and not cfg.embed_scale and cfg.final_norm,
             f"this model's shape has no {family} equivalent; {family} needs a causal pre-norm RMSNorm/SwiGLU/RoPE "
             "decoder with an LM head")
    _require(not cfg.qk_norm or family == "qwen3", f"{family} has no QK-norm; export this model as qwen3")
    out = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.dropout, **_rope_to_hf(cfg),
    )
    if family == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
        _require(not cfg.qkv_bias or cfg.bias, "llama has no q/k/v-only bias; export this model as qwen2")
        _require(cfg.sliding_window is None, "llama has no sliding window; export this model as mistral")
    elif family == "mistral":
        _require(not cfg.bias and not cfg.qkv_bias, "mistral has no biases; export this model as llama or qwen2")
        out["sliding_window"] = cfg.sliding_window
    elif family == "qwen2":
        _require(cfg.qkv_bias and not cfg.bias, "qwen2 has biases on q/k/v only; export this model as llama")
        _require(cfg.sliding_window is None, "qwen2 export supports full attention only; export as mistral")
        out["use_sliding_window"] = False
    return out


def _llama_normalize(key: str) -> str | None:
    if key.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
        return None
    return key


_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
                       max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, rope_theta=10000.0)
_MISTRAL_DEFAULTS = dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                         max_position_embeddings=4096 * 32, sliding_window=4096)
_QWEN2_DEFAULTS = dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                       max_position_embeddings=32768)


# ---- GPT-2 ----------------------------------------------------------------------------------------
_GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _gpt2_to_lmforge(hf: dict[str, Any]) -> dict[str, Any]:
    d = _GPT2_DEFAULTS
    act = _get(hf, "activation_function", d)
    _require(act in _GPT2_ACTS, f"gpt2: activation_function='{act}' is not supported; use one of {list(_GPT2_ACTS)}")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False),
             "gpt2: scale_attn_by_inverse_layer_idx=true is not supported")
    _require(hf.get("scale_attn_weights", True), "gpt2: scale_attn_weights=false is not supported")
    _require(not hf.get("add_cross_attention", False), "gpt2: cross-attention is not supported")
    dim = int(_get(hf, "n_embd", d))
    return dict(
        vocab_size=int(_get(hf, "vocab_size", d)), dim=dim, n_layers=int(_get(hf, "n_layer", d)),
        n_heads=int(_get(hf, "n_head", d)), ffn_hidden=int(hf.get("n_inner") or 4 * dim),
        activation=_GPT2_ACTS[act], norm="layernorm", norm_eps=float(_get(hf, "layer_norm_epsilon", d)),
        pos_encoding="learned", max_seq_len=int(_get(hf, "n_positions", d)), bias=True,
        tie_embeddings=bool(_get(hf, "tie_word_embeddings", d)), dropout=float(_get(hf, "resid_pdrop", d)),
        init_std=float(_get(hf, "initializer_range", d)),
    )


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    acts = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
    _require(cfg.causal and cfg.lm_head and cfg.pos_encoding == "learned" and cfg.norm == "layernorm"
             and cfg.norm_position == "pre" and cfg.bias and cfg.activation in acts and cfg.final_norm
             and cfg.n_kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.dim
             and not cfg.embedding_norm and not cfg.type_vocab_size and not cfg.embed_scale
             and cfg.sliding_window is None,
             "this model's shape has no gpt2 equivalent; gpt2 needs a causal pre-norm LayerNorm decoder with "
             "learned positions, biases, MHA and a gelu/relu FFN")
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_inner=cfg.hidden_dim, n_positions=cfg.max_seq_len, activation_function=acts[cfg.activation],
                layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                initializer_range=cfg.init_std, scale_attn_weights=True)


def _gpt2_normalize(key: str) -> str | None:
    if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers in older checkpoints
        return None
    if key.startswith("lm_head.") or key.startswith("transformer."):
        return key
    return "transformer." + key  # GPT2Model checkpoints (e.g. the original `gpt2`) carry no prefix


_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5,
                      initializer_range=0.02, tie_word_embeddings=True)


# ---- BERT -----------------------------------------------------------------------------------------
def _bert_to_lmforge(hf: dict[str, Any]) -> dict[str, Any]:
    d = _BERT_DEFAULTS
    act = _get(hf, "hidden_act", d)
    _require(act in ("gelu", "relu"), f"bert: hidden_act='{act}' is not supported; use gelu or relu")
    pos = hf.get("position_embedding_type", "absolute")
    _require(pos == "absolute", f"bert: position_embedding_type='{pos}' is not supported; lmforge has absolute only")
    _require(not hf.get("is_decoder", False), "bert: is_decoder=true is not supported; import an encoder")
    return dict(
        vocab_size=int(_get(hf, "vocab_size", d)), dim=int(_get(hf, "hidden_size", d)),
        n_layers=int(_get(hf, "num_hidden_layers", d)), n_heads=int(_get(hf, "num_attention_heads", d)),
        ffn_hidden=int(_get(hf, "intermediate_size", d)), activation=act, norm="layernorm",
        norm_eps=float(_get(hf, "layer_norm_eps", d)), norm_position="post", pos_encoding="learned",
        max_seq_len=int(_get(hf, "max_position_embeddings", d)), bias=True, causal=False, embedding_norm=True,
        final_norm=False, type_vocab_size=int(_get(hf, "type_vocab_size", d)), lm_head=False,
        dropout=float(_get(hf, "hidden_dropout_prob", d)), init_std=float(_get(hf, "initializer_range", d)),
    )


def _bert_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _require(not cfg.causal and not cfg.lm_head and cfg.pos_encoding == "learned" and cfg.norm == "layernorm"
             and cfg.norm_position == "post" and cfg.bias and cfg.embedding_norm and not cfg.final_norm
             and cfg.activation in ("gelu", "relu") and cfg.type_vocab_size > 0 and cfg.n_kv_heads == cfg.n_heads
             and cfg.head_dim * cfg.n_heads == cfg.dim and not cfg.embed_scale,
             "this model's shape has no bert equivalent; bert needs a bidirectional post-norm LayerNorm encoder "
             "with learned positions, token types, an embedding norm, biases and MHA")
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=cfg.hidden_dim, hidden_act=cfg.activation,
                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute",
                tie_word_embeddings=True)


def _bert_normalize(key: str) -> str | None:
    key = key.removeprefix("bert.")
    if key.endswith("position_ids") or key.startswith("cls.seq_relationship.") or key in (
            "cls.predictions.decoder.bias",  # the same tensor as cls.predictions.bias
            "cls.predictions.decoder.weight"):  # tied to the word embeddings
        return None
    # Original TF-converted checkpoints name LayerNorm parameters gamma / beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                      max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02,
                      layer_norm_eps=1e-12)


# ---- the registry ---------------------------------------------------------------------------------
def _llama_family(name: str, model_type: str, arch: str, defaults: dict[str, Any]) -> Family:
    return Family(name, model_type, (arch,), _LLAMA_MODULES,
                  lambda hf: _llama_like_to_lmforge(hf, defaults, name), lambda cfg: _llama_like_to_hf(cfg, name),
                  _llama_normalize, defaults=defaults)


FAMILIES: dict[str, Family] = {
    "llama": _llama_family("llama", "llama", "LlamaForCausalLM", _LLAMA_DEFAULTS),
    "mistral": _llama_family("mistral", "mistral", "MistralForCausalLM", _MISTRAL_DEFAULTS),
    "qwen2": _llama_family("qwen2", "qwen2", "Qwen2ForCausalLM", _QWEN2_DEFAULTS),
    "gpt2": Family("gpt2", "gpt2", ("GPT2LMHeadModel", "GPT2Model"), _GPT2_MODULES, _gpt2_to_lmforge,
                   _gpt2_to_hf, _gpt2_normalize, defaults=_GPT2_DEFAULTS),
    "bert": Family("bert", "bert", ("BertModel", "BertForMaskedLM", "BertForPreTraining"), _BERT_MODULES,
                   _bert_to_lmforge, _bert_to_hf, _bert_normalize, head_keys=_BERT_HEAD_KEYS,
                   defaults=_BERT_DEFAULTS),
}


def family_for_hf_config(hf: dict[str, Any]) -> Family:
    """Pick the family from ``model_type`` (falling back to ``architectures``)."""
    model_type = hf.get("model_type")
    for fam in FAMILIES.values():
        if fam.model_type == model_type:
            return fam
    archs = hf.get("architectures") or []
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    supported = ", ".join(a for f in FAMILIES.values() for a in f.architectures)
    raise UserError(f"Hugging Face model_type '{model_type}' (architectures {archs}) is not supported; "
                    f"lmforge imports {supported}")


def family_for_model_config(cfg: ModelConfig) -> Family:
    """The HF family an lmforge config maps to, from its shape."""
    if not cfg.causal:
        return FAMILIES["bert"]
    if cfg.pos_encoding == "learned":
        return FAMILIES["gpt2"]
    if cfg.pos_encoding == "rope":
        if cfg.activation == "relu2":  # a non-gated squared-ReLU MLP: Arcee (registered by lmforge.artifacts.hf)
            return FAMILIES["arcee"]
        if cfg.qk_norm and "qwen3" in FAMILIES:
            return FAMILIES["qwen3"]
        if cfg.qkv_bias and not cfg.bias:
            return FAMILIES["qwen2"]
        if cfg.sliding_window is not None:
            return FAMILIES["mistral"]
        return FAMILIES["llama"]
    raise UserError(f"a model with pos_encoding='{cfg.pos_encoding}' has no Hugging Face equivalent; export "
                    "supports Llama/Mistral/Qwen2/Arcee (rope), GPT-2 (learned, causal) and BERT (encoder) shapes")


def require_hf_expressible(cfg: ModelConfig) -> None:
    """Refuse the recipe options no exported family computes (Llama/Mistral/Qwen2/Qwen3/Arcee/GPT-2/BERT would
    load the weights and silently run a different model). A squared-ReLU MLP exports as Arcee, QK-norm as Qwen3
    (lmforge.artifacts.hf.qwen3), not both at once."""
    options = []
    if cfg.qk_norm and cfg.activation == "relu2":
        options.append("model.qk_norm=true with model.activation=relu2")
    if cfg.logit_softcap is not None:
        options.append(f"model.logit_softcap={cfg.logit_softcap:g}")
    if options:
        raise UserError(f"this model uses {', '.join(options)}, which the Hugging Face families lmforge exports "
                        "(llama, mistral, qwen2, arcee, gpt2, bert) cannot express; use it with lmforge's own commands "
                        "(generate, eval, serve), or train without these options to export")


def hf_to_model_config(hf: dict[str, Any], family: Family | None = None) -> ModelConfig:
    family = family or family_for_hf_config(hf)
    return from_dict(ModelConfig, family.to_lmforge(hf), prefix="model")


def model_config_to_hf(cfg: ModelConfig, family: Family | None = None,
                       base: dict[str, Any] | None = None) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg``; ``base`` (the imported original) keeps the fields lmforge
    does not model (token ids, extra options) and its RoPE layout."""
    require_hf_expressible(cfg)
    family = family or family_for_model_config(cfg)
    out = dict(base or {})
    fields = family.to_hf(cfg)
    if "rope_parameters" in out and "rope_theta" in fields:  # keep a v5-style config v5-style
        rp = {"rope_type": "default", "rope_theta": fields.pop("rope_theta")}
        scaling = fields.pop("rope_scaling")
        if scaling:
            rp.update(scaling)
        out["rope_parameters"] = rp
    elif "rope_theta" in fields:
        out.pop("rope_parameters", None)
        if fields["rope_scaling"] is None and "rope_scaling" not in out:
            fields.pop("rope_scaling")
    out.update(fields)
    out["model_type"] = family.model_type
    if not out.get("architectures") or out["architectures"][0] not in family.architectures:
        out["architectures"] = [family.architectures[0]]
    return out


__all__ = ["FAMILIES", "Family", "family_for_hf_config", "family_for_model_config", "hf_to_model_config",
           "model_config_to_hf", "require_hf_expressible", "to_dict"]
