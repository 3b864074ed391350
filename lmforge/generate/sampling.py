"""Next-token selection: greedy, temperature, top-k, top-p (nucleus), with a seeded generator.

Parameters are checked before any tensor is touched (:func:`check_sampling`, :func:`check_budget`):
a NaN temperature or a 10^8-token request is a one-line error, not a traceback or a 50 GB allocation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lmforge.config import UserError


class SamplingError(UserError, ValueError):
    """A sampling parameter out of range (a ValueError too, for callers that catch those)."""


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """temperature finite and >= 0; top_k >= 0 (0 or None = off); 0 < top_p <= 1 (None = off)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise SamplingError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise SamplingError(f"top_k={top_k!r} must be an integer >= 0 (0 = no top-k filter)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not math.isfinite(top_p) or not 0.0 < top_p <= 1.0):
        raise SamplingError(f"top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)")


def check_budget(prompt_lengths: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """Every prompt non-empty, max_new_tokens >= 1, and prompt + max_new_tokens within the model's context."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    for i, n in enumerate(prompt_lengths):
        if n < 1:
            raise SamplingError(f"prompt {i + 1} is empty (no tokens); pass some text")
    longest = max(prompt_lengths, default=0)
    if longest + max_new_tokens > max_seq_len:
        room = max_seq_len - longest
        fix = f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"
        raise SamplingError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                            f"context of {max_seq_len} tokens; {fix}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask (to -inf) the logits outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def apply_logit_bias(logits: torch.Tensor, biases: Sequence[dict[int, float] | None]) -> torch.Tensor:
    """logits (B, V) with row i's ``biases[i]`` ({token id: value}, None = none) added (OpenAI's
    ``logit_bias``: -100 all but bans a token, +100 all but forces it). Returns ``logits`` itself when no
    row has a bias, else a float copy."""
    if not any(biases):
        return logits
    logits = logits.float().clone()
    for i, bias in enumerate(biases):
        if bias:
            ids = torch.tensor(list(bias.keys()), device=logits.device)
            logits[i].index_add_(0, ids, torch.tensor(list(bias.values()), device=logits.device))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 means greedy (argmax)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
