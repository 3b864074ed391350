"""Batched generation over token ids with a KV cache: left-padded prefill, then one token per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.generate.kv_cache import KVCache
from lmforge.generate.sampling import sample_next
from lmforge.models.transformer import logits_at


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = None
    stop_strings: Sequence[str] = ()


def _as_batch(prompts: Any, tokenizer) -> tuple[list[list[int]], bool, bool]:
    """Normalize prompts -> (list of id lists, was_text, was_single)."""
    if isinstance(prompts, str):
        prompts, single = [prompts], True
    elif prompts and isinstance(prompts[0], int):
        prompts, single = [list(prompts)], True
    elif torch.is_tensor(prompts):
        prompts, single = prompts.tolist(), prompts.dim() == 1
        if single:
            prompts = [prompts]
    else:
        prompts, single = list(prompts), False
    is_text = bool(prompts) and isinstance(prompts[0], str)
    if is_text:
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass tokenizer=... or token ids")
        ids = [tokenizer.encode(p) for p in prompts]
    else:
        ids = [list(map(int, p)) for p in prompts]
    if not ids or any(len(p) == 0 for p in ids):
        raise ValueError("every prompt needs at least one token")
    return ids, is_text, single


def last_logits(model, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, V) logits of the last position only: a prefill runs the LM head on one position per row, not
    on all (B, L, V) (`lmforge.models.transformer.logits_at`)."""
    return logits_at(model, tokens, lambda logits_of: logits_of((slice(None), -1)), **kwargs)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], gen: GenerationConfig, tokenizer=None) -> list[list[int]]:
    """Generate continuations for a batch of id lists. Returns the new ids of each prompt (EOS excluded)."""
    cfg = model.cfg
    if not cfg.causal or not cfg.lm_head:
        raise ValueError("generation needs a causal model with an LM head (this one is an encoder)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B, L = len(prompts), max(len(p) for p in prompts)
    total = L + gen.max_new_tokens
    if cfg.pos_encoding in ("learned", "sinusoidal") and total > cfg.max_seq_len:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({gen.max_new_tokens}) exceeds the model's "
                         f"max_seq_len={cfg.max_seq_len}; shorten the prompt or ask for fewer tokens")
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    key_valid = torch.zeros(B, total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: the last prompt token of every row sits at L-1
        tokens[i, L - len(p):] = torch.tensor(p, device=device)
        key_valid[i, L - len(p):L] = True
    padded = not bool(key_valid[:, :L].all())
    positions = (key_valid[:, :L].long().cumsum(-1) - 1).clamp(min=0)
    mask = None
    if padded:  # pad keys hidden; pad queries see themselves so no row is all -inf
        eye = torch.eye(L, dtype=torch.bool, device=device)
        mask = key_valid[:, None, None, :L] | eye[None, None]
    generator = torch.Generator(device=device).manual_seed(gen.seed) if gen.seed is not None else None
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(cfg, B, total, device=device, dtype=dtype)
        logits = last_logits(model, tokens, positions=positions, mask=mask, cache=cache)  # (B, V)
        next_pos = positions[:, -1] + 1
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(gen.max_new_tokens):
            nxt = sample_next(logits, gen.temperature, gen.top_k, gen.top_p, generator)
            picked = nxt.tolist()  # the step's one read-back from the device
            for i in range(B):
                if done[i]:
                    continue
                t = picked[i]
                if gen.eos_id is not None and t == gen.eos_id:
                    done[i] = True
                    continue
                out[i].append(t)
                if gen.stop_strings and tokenizer is not None:
                    text = tokenizer.decode(out[i])
                    if any(s in text for s in gen.stop_strings):
                        done[i] = True
            if all(done) or step == gen.max_new_tokens - 1:
                break
            key_valid[:, L + step] = True
            m = key_valid[:, None, None, : L + step + 1] if padded else None
            logits = model(nxt[:, None], positions=next_pos[:, None], mask=m, cache=cache)[:, -1]
            next_pos = next_pos + 1
        return out
    finally:
        model.train(was_training)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def generate(model, prompts, tokenizer=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_id: int | None = None, stop_strings: Sequence[str] = ()):
    """Generate from text (with a tokenizer) or token ids; a single prompt gives a single result.

    Text in -> completion text out (cut at the first stop string). Ids in -> new ids out.
    EOS defaults to the tokenizer's EOS id when a tokenizer is given.
    """
    ids, is_text, single = _as_batch(prompts, tokenizer)
    if eos_id is None and tokenizer is not None:
        eos_id = getattr(tokenizer, "eos_id", None)
    gen = GenerationConfig(max_new_tokens, temperature, top_k, top_p, seed, eos_id, tuple(stop_strings))
    out = generate_ids(model, ids, gen, tokenizer)
    if is_text:
        out = [cut_at_stop(tokenizer.decode(o), gen.stop_strings) for o in out]
    return out[0] if single else out
