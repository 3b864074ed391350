"""The Transformer, as single-device code.

Parallelism (tensor parallel, activation checkpointing, compile, FSDP2) is applied from outside
(`lmforge.distributed`); adapters and heads are injected (`lmforge.models.lora`, `.heads`).
Module names are stable: they are the checkpoint keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.attention import KERNELS, reference_attention  # noqa: F401 (reference_attention: re-exported)
from lmforge.models.config import ModelConfig
from lmforge.models.embeddings import add_input_embeddings, embed_inputs
from lmforge.models.masks import StepMask, attention_mask
from lmforge.models.positional import (
    apply_rope,
    rope_attention_scale,
    rope_cos_sin,
    rope_dynamic_inv_freq,
    rope_inv_freq,
    sinusoidal_table,
)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


class Attention(nn.Module):
    """Multi-head (and grouped-query) self-attention with output projection W^O."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.dim, cfg.q_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.q_dim, cfg.dim, bias=cfg.bias)
        if cfg.qk_norm:  # one weight of width head_dim, shared by the heads (Qwen3 / Gemma 3 layout)
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.kernel = KERNELS[cfg.attention]  # chosen once; `lmforge.models.attention.use_attention_kernel`

    def forward(self, x, rope=None, mask=None, cache=None, layer_idx=0):
        B, T, _ = x.shape
        # Heads are read from the projected width so a tensor-parallel shard (fewer local heads) works too.
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, d)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, KV, d)
        if self.cfg.qk_norm:  # normalize each head's q and k before RoPE: bounded attention logits
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d), (B, KV, T, d)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, d)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, KV, S, d), S = cached + T
        if isinstance(mask, StepMask):  # built once per forward by Transformer.hidden_states
            mask, causal = mask.attn_mask, mask.is_causal
        else:  # called on its own: the caller's mask (or None) with causality added here
            mask, causal = attention_mask(T, k.size(2), causal=self.cfg.causal, window=self.cfg.sliding_window,
                                          mask=mask, device=x.device)
        y = self.kernel(q, k, v, mask, causal, self.cfg.dropout if self.training else 0.0)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*d)
        return self.wo(y)


def activation_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    """The non-gated activations by config name (``relu2``: relu(x)², So et al. 2021, "Primer")."""
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


class FeedForward(nn.Module):
    """Position-wise FFN: w2(act(w1 x)) or, for SwiGLU, w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.bias)
        if cfg.activation == "swiglu":
            self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.bias)

    def forward(self, x):
        if self.activation == "swiglu":
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(activation_fn(self.activation, self.w1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_norm = cfg.norm_position == "pre"
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = make_norm(cfg)
        self.ffn_norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, mask=None, cache=None):
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), rope, mask, cache, self.layer_idx))
            return x + self.dropout(self.feed_forward(self.ffn_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, rope, mask, cache, self.layer_idx)))
        return self.ffn_norm(x + self.dropout(self.feed_forward(x)))


class Transformer(nn.Module):
    """Decoder-only LM (causal) or encoder (bidirectional), selected by the config."""

    # forward(..., head=fn) runs ``fn(hidden, lm_head)`` in place of the LM head (`lmforge.train.losses`)
    accepts_loss_head = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        add_input_embeddings(self, cfg, make_norm)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        if cfg.final_norm:
            self.norm = make_norm(cfg)
        if cfg.lm_head:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived, not learned: rebuilt by init_weights() / init_buffers(), never checkpointed.
        if cfg.pos_encoding == "rope":
            self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.max_seq_len, cfg.dim), persistent=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # ---- initialization ------------------------------------------------------------------------
    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the derived buffers in fp32 on the weights' device (after `to_empty`/`.to(dtype)`)."""
        device = self.tok_embeddings.weight.device
        if self.cfg.pos_encoding == "rope":
            self.register_buffer("rope_inv_freq", rope_inv_freq(self.cfg).to(device), persistent=False)
        if self.cfg.pos_encoding == "sinusoidal":
            table = sinusoidal_table(self.cfg.max_seq_len, self.cfg.dim).to(device)
            self.register_buffer("sinusoidal", table, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, std) weights; output projections (wo, w2) scaled by 1/√(2·layers) (GPT-2)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.tok_embeddings.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = out_std if name.endswith((".wo", ".w2")) else std
                _normal(module.weight, s, gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                _normal(module.weight, std, gen)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        self.tie_weights()
        self.init_buffers()

    # ---- forward -------------------------------------------------------------------------------
    def hidden_states(self, tokens, positions=None, mask=None, cache=None, token_type_ids=None):
        """tokens (B, T) -> final hidden states (B, T, dim).

        positions: (B, T) absolute positions (default: cache offset + arange). mask: bool
        (B, 1, T, S), True = may attend (padding / document boundaries); causality is added here.
        cache: a `lmforge.generate.kv_cache.KVCache`; its length advances by T.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        h = embed_inputs(self, tokens, positions, token_type_ids)  # (B, T, dim)
        h = self.dropout(h)
        rope = None
        if self.cfg.pos_encoding == "rope":
            inv_freq = rope_dynamic_inv_freq(self.cfg, self.rope_inv_freq, positions)  # the buffer unless dynamic
            rope = rope_cos_sin(inv_freq, positions, h.dtype, rope_attention_scale(self.cfg))
        if cache is None:  # causality, window and the caller's mask folded once here, not in every layer
            mask = StepMask(*attention_mask(T, T, causal=self.cfg.causal, window=self.cfg.sliding_window,
                                            mask=mask, device=tokens.device))
        # (with a KV cache each layer adds causality against the keys its cache returns: decoding steps are short)
        for layer in self.layers:
            h = layer(h, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if self.cfg.final_norm:
            h = self.norm(h)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., dim) -> logits (..., vocab): the LM head, then the soft cap if the
        config sets one (a chunked loss applies the same cap itself: `lmforge.train.losses`)."""
        return softcap(self.output(h), self.cfg.logit_softcap)

    def forward(self, tokens, positions=None, mask=None, cache=None, token_type_ids=None, head=None):
        """tokens (B, T) -> logits (B, T, vocab) (hidden states when the model has no LM head).

        head: a callable ``head(hidden (B, T, dim), lm_head module or None)`` run in place of the LM head,
        inside this forward, whose result is returned — how a chunked loss (`lmforge.train.losses`) reads the
        head's weight while FSDP2 holds it gathered (its hooks wrap this forward, not `hidden_states`).
        """
        h = self.hidden_states(tokens, positions, mask, cache, token_type_ids)
        if head is not None:
            return head(h, self.output if self.cfg.lm_head else None)
        return self.logits(h) if self.cfg.lm_head else h


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap·tanh(logits / cap): smooth, keeps small logits as they are and bounds large ones to (-cap, cap)."""
    if cap is None:
        return logits
    return cap * torch.tanh(logits / cap)


def _normal(t: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = None, init: bool = True) -> Transformer:
    """Build on the meta device (no memory), materialize on `device`, then initialize.

    With ``init=False`` the weights are left uninitialized (for loading a checkpoint right after).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    if init:
        model.init_weights(seed)
    else:
        model.init_buffers()
    return model


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def logits_at(model: nn.Module, tokens: torch.Tensor, fn, **kwargs):
    """``fn(logits_of)`` for a forward of ``model`` on ``tokens``, where ``logits_of(index)`` gives the
    (soft-capped) logits of the final hidden states ``h[index]`` (h: (B, T, dim)) — so only the positions
    wanted go through the LM head: the last one for a prefill, continuations for scoring, chunks for a
    perplexity. An lmforge `Transformer` (also under FSDP2 / compile wrappers) runs ``fn`` inside its
    forward (``head=``), where FSDP2 holds the head's weight gathered; any other model's full logits are
    indexed instead."""
    core = model
    while isinstance(getattr(core, "module", None) or getattr(core, "_orig_mod", None), nn.Module):
        core = getattr(core, "module", None) or core._orig_mod
    if isinstance(core, Transformer) and core.cfg.lm_head:
        return model(tokens, head=lambda h, _output: fn(lambda index: core.logits(h[index])), **kwargs)
    full = model(tokens, **kwargs)
    return fn(lambda index: full[index])
