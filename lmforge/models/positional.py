"""Positional encodings: sinusoidal (Vaswani et al.), RoPE (with Llama-3 or YaRN frequency scaling)."""

from __future__ import annotations

import math

import torch

from lmforge.models.config import ModelConfig


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / base^(2i/dim)), PE[pos, 2i+1] = cos(pos / base^(2i/dim)). Shape (n_positions, dim)."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    div = torch.pow(base, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos / div)
    table[:, 1::2] = torch.cos(pos / div)
    return table.float()


def rope_inv_freq(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) for i < d/2, Llama-3 / YaRN / dynamic-NTK scaled when configured
    (dynamic: for a forward pass whose longest position is ``seq_len - 1``). Shape (head_dim/2,)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.type == "yarn":
        return _yarn_inv_freq(cfg)
    if s.type == "dynamic":
        return _dynamic_inv_freq(cfg, seq_len)
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """YaRN: interpolated (÷ factor) frequencies below a linear ramp over the dimensions, extrapolated (as
    they are) above it; the ramp's bounds are where a dimension turns beta_fast / beta_slow times over the
    original context. The same float32 arithmetic as transformers' ``_compute_yarn_parameters``."""
    s, d, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return (d * math.log(s.original_max_seq_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).to(dtype=torch.float) / d)
    extrapolation = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _dynamic_inv_freq(cfg: ModelConfig, seq_len: int | None) -> torch.Tensor:
    """Dynamic NTK: base · (factor·L/L0 − (factor − 1))^(d/(d−2)) with L = max(seq_len, L0), L0 the original
    context; the same float32 arithmetic as transformers' ``_compute_dynamic_ntk_parameters``."""
    s, d = cfg.rope_scaling, cfg.head_dim
    length = torch.maximum(torch.tensor(seq_len or s.original_max_seq_len), torch.tensor(s.original_max_seq_len))
    base = cfg.rope_theta * ((s.factor * length / s.original_max_seq_len) - (s.factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype=torch.float) / d))


def rope_dynamic_inv_freq(cfg: ModelConfig, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The inverse frequencies for this forward pass: ``inv_freq`` (the buffer) unless the scaling is dynamic
    and ``positions`` reach beyond the original context (then recomputed for the longest one)."""
    s = cfg.rope_scaling
    if s is None or s.type != "dynamic":
        return inv_freq
    n = int(positions.max()) + 1
    if n <= s.original_max_seq_len:
        return inv_freq
    return _dynamic_inv_freq(cfg, n).to(inv_freq.device)


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor cos/sin are scaled by: YaRN's attention factor (0.1·ln(factor) + 1 unless set), else 1."""
    s = cfg.rope_scaling
    if s is None or s.type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return float(s.attention_factor)
    return 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (times ``scale``, `rope_attention_scale`) for positions (B, T) -> each (B, 1, T, head_dim),
    computed in fp32."""
    freqs = positions.float()[..., None] * inv_freq.float()[None, None, :]  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d): half-split layout (GPT-NeoX / HF)
    if scale != 1.0:
        return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles. x: (B, heads, T, head_dim)."""
    return x * cos + _rotate_half(x) * sin
