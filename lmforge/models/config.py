"""Model configuration: one dataclass that validates itself, and counts computed from it alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmforge.config import ConfigError

Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu", "relu2"]  # relu2: relu(x)², non-gated (Primer)
Norm = Literal["layernorm", "rmsnorm"]
PosEncoding = Literal["sinusoidal", "learned", "rope", "none"]


@dataclass
class RopeScaling:
    """RoPE frequency scaling for long contexts, as HF configs name it (``rope_type``): ``llama3`` (Llama 3.1,
    ``low_freq_factor`` / ``high_freq_factor``), ``yarn`` (YaRN, Peng et al. 2023, as Qwen ships it:
    ``beta_fast`` / ``beta_slow`` bound the frequency ramp, cos/sin scaled by ``attention_factor``, default
    0.1·ln(factor) + 1) or ``dynamic`` (dynamic NTK: beyond ``original_max_seq_len`` positions the RoPE base
    grows with the longest position of the forward pass)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192
    type: Literal["llama3", "yarn", "dynamic"] = "llama3"
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only
    attention_factor: float | None = None  # yarn only; None = 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn only: round the ramp's bounds to whole dimensions (HF's default)


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; between = GQA
    head_dim: int | None = None  # None = dim // n_heads
    ffn_hidden: int | None = None  # explicit FFN width; else derived from the two below
    ffn_multiplier: float | None = None  # Llama: hidden = multiple_of * ceil(mult * 8*dim/3 / multiple_of)
    multiple_of: int = 256
    activation: Activation = "swiglu"
    norm: Norm = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"
    pos_encoding: PosEncoding = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bias: bool = False  # bias on every linear layer (GPT-2, BERT, classic Transformer)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    dropout: float = 0.0  # embeddings, attention probabilities, residual branches
    causal: bool = True  # False = bidirectional encoder (BERT)
    sliding_window: int | None = None  # causal attention to the last W keys only (Mistral v0.1); None = all
    embed_scale: bool = False  # multiply token embeddings by sqrt(dim) (Vaswani et al.)
    embedding_norm: bool = False  # norm after the embedding sum (BERT)
    final_norm: bool | None = None  # None = True for pre-norm, False for post-norm
    type_vocab_size: int = 0  # token-type (segment) embeddings (BERT)
    lm_head: bool = True  # an output projection to the vocabulary
    init_std: float = 0.02
    attention: Literal["sdpa", "reference"] = "sdpa"
    # Recipe options (off by default; `bench/tokens_to_target.py` measures them, README "Recipe"):
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (OLMo 2, Qwen3, Gemma 3)
    logit_softcap: float | None = None  # logits -> cap·tanh(logits/cap) in the model's output (Gemma 2)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(
                    f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                    f"choose n_heads dividing dim (e.g. {_nearest_divisor(self.dim, self.n_heads)}) or set head_dim"
                )
            self.head_dim = self.dim // self.n_heads
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                f"use a divisor of n_heads (e.g. {_nearest_divisor(self.n_heads, self.n_kv_heads)})"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rope")
        if self.pos_encoding == "sinusoidal" and self.dim % 2:
            raise ConfigError(f"model.dim={self.dim} must be even for sinusoidal positions")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window={self.sliding_window} must be positive (or null for full attention)")
        if self.sliding_window is not None and not self.causal:
            raise ConfigError("model.sliding_window needs a causal model; set model.sliding_window=null")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.tie_embeddings and not self.lm_head:
            raise ConfigError("model.tie_embeddings=true needs model.lm_head=true")
        if self.logit_softcap is not None and not self.logit_softcap > 0:
            raise ConfigError(f"model.logit_softcap={self.logit_softcap} must be positive (e.g. 30), or null for none")
        if self.logit_softcap is not None and not self.lm_head:
            raise ConfigError("model.logit_softcap caps the LM head's logits; this model has none (model.lm_head=false)")
        if self.final_norm is None:
            self.final_norm = self.norm_position == "pre"
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.type not in ("llama3", "yarn", "dynamic"):
            raise ConfigError(f"model.rope_scaling.type={self.rope_scaling.type!r} must be llama3, yarn or dynamic")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.activation != "swiglu":
            return 4 * self.dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_multiplier is not None:
            hidden = int(self.ffn_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def _norm_params(self) -> int:
        return self.dim * (2 if self.norm == "layernorm" else 1)

    def layer_params(self) -> int:
        d, h = self.dim, self.hidden_dim
        attn = d * self.q_dim + 2 * d * self.kv_dim + self.q_dim * d
        if self.bias:
            attn += self.q_dim + 2 * self.kv_dim + d
        elif self.qkv_bias:
            attn += self.q_dim + 2 * self.kv_dim
        n_mats = 3 if self.activation == "swiglu" else 2
        ffn = n_mats * d * h + ((n_mats - 1) * h + d if self.bias else 0)
        qk_norm = 2 * self.head_dim if self.qk_norm else 0  # one RMSNorm weight for q, one for k
        return attn + ffn + 2 * self._norm_params() + qk_norm

    def embedding_params(self) -> int:
        n = self.vocab_size * self.dim
        if self.pos_encoding == "learned":
            n += self.max_seq_len * self.dim
        n += self.type_vocab_size * self.dim
        if self.embedding_norm:
            n += self._norm_params()
        return n

    def num_params(self) -> int:
        """Exact parameter count (tied weights counted once), from the config alone."""
        n = self.embedding_params() + self.n_layers * self.layer_params()
        if self.final_norm:
            n += self._norm_params()
        if self.lm_head and not self.tie_embeddings:
            n += self.vocab_size * self.dim
        return n

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix product per token (all linear weights, incl. the head)."""
        d, h = self.dim, self.hidden_dim
        attn = 2 * d * self.q_dim + 2 * d * self.kv_dim
        ffn = (3 if self.activation == "swiglu" else 2) * d * h
        head = self.vocab_size * d if self.lm_head else 0
        return self.n_layers * (attn + ffn) + head

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6·N (matmul params, fwd+bwd) + 12·L·H·Q·T (attention scores),
        the PaLM / nanoGPT estimate. Causal attention does about half the score work, which
        FLOP-count conventions (and MFU figures) ignore; so do we."""
        t = seq_len or self.max_seq_len
        return 6 * self.matmul_params() + 12 * self.n_layers * self.n_heads * self.head_dim * t


def _nearest_divisor(n: int, near: int) -> int:
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - near), k))
