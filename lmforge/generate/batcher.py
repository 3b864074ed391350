"""Continuous batching over a `SlotKVCache`: sequences join and leave a running batch between decode steps.

`ContinuousBatcher` owns no thread: a caller (the server's engine thread) calls `add` to prefill a new
sequence into a free slot, `step` to decode one token for every active sequence in one forward pass, and
`remove` to free a slot early (a client went away). Each sequence keeps its own sampling settings and
seeded generator, so its output does not depend on which other sequences share the batch: a greedy
sequence served in a batch produces the same tokens as served alone.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lmforge.generate.engine import last_logits
from lmforge.generate.kv_cache import SlotKVCache
from lmforge.generate.sampling import apply_logit_bias, check_sampling, sample_next
from lmforge.generate.text_stream import TextStream


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None  # None: a fresh random seed
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()  # EOS and end-of-turn tokens: end the sequence, not part of the text
    logit_bias: dict[int, float] | None = None  # {token id: added to its logit} (the server's logit_bias)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be positive")


_ids = itertools.count(1)


@dataclass(eq=False)
class Sequence:
    """One request's state: prompt, sampling settings, generated ids and text, and how it ended."""

    prompt: list[int]
    params: SamplingParams
    tokenizer: object = None
    id: int = field(default_factory=lambda: next(_ids))
    slot: int | None = None
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop id or string) | "length" | "cancelled"
    generator: torch.Generator | None = None
    stream: TextStream | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""


@dataclass
class Update:
    """What one call produced for one sequence: newly final text (may be "") and the ids behind it."""

    seq: Sequence
    text: str
    token_ids: list[int]
    finished: bool


class ContinuousBatcher:
    def __init__(self, model, tokenizer=None, n_slots: int = 8, max_len: int | None = None):
        cfg = model.cfg
        if not cfg.causal or not cfg.lm_head:
            raise ValueError("continuous batching needs a causal model with an LM head (this one is an encoder)")
        self.model, self.tokenizer = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = p.device
        self.max_len = max_len or cfg.max_seq_len
        self.cache = SlotKVCache(cfg, n_slots, self.max_len, device=p.device, dtype=p.dtype)
        self.slots: list[Sequence | None] = [None] * n_slots

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def remove(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Free ``seq``'s slot (it leaves the batch before the next step)."""
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        seq.slot = None
        if seq.finish_reason is None:
            seq.finish_reason = reason

    # ---- the two model calls -----------------------------------------------------------------------
    @torch.no_grad()
    def add(self, seq: Sequence) -> Update:
        """Prefill ``seq`` alone into a free slot and sample its first token."""
        if not seq.prompt:
            raise ValueError("every prompt needs at least one token")
        if len(seq.prompt) + 1 > self.max_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in a {self.max_len}-token context")
        slot = self.slots.index(None)  # ValueError when full: callers check free_slots first
        seq.slot, self.slots[slot] = slot, seq
        seed = seq.params.seed % (1 << 63) if seq.params.seed is not None else random.getrandbits(63)
        seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        seq.stream = TextStream(self.tokenizer, seq.params.stop_strings) if self.tokenizer is not None else None
        tokens = torch.tensor([seq.prompt], device=self.device)
        positions = torch.arange(len(seq.prompt), device=self.device)[None]
        try:
            logits = last_logits(self.model, tokens, positions=positions, cache=self.cache.prefill(slot))  # (1, V)
        except BaseException:
            self.remove(seq, "error")
            raise
        return self._accept(seq, self._sample([seq], logits)[0])

    @torch.no_grad()
    def step(self) -> list[Update]:
        """One decode step for every active sequence (one forward pass); finished ones leave the batch."""
        seqs = self.active
        if not seqs:
            return []
        view = self.cache.decode([s.slot for s in seqs])
        tokens = torch.tensor([[s.out[-1]] for s in seqs], device=self.device)  # (B, 1)
        positions = view.pos[:, None]  # (B, 1): each row's own position
        logits = self.model(tokens, positions=positions, mask=view.key_mask, cache=view)[:, -1]  # (B, V)
        return [self._accept(s, t) for s, t in zip(seqs, self._sample(seqs, logits))]

    # ---- per-sequence sampling and ending ----------------------------------------------------------
    def _sample(self, seqs: Seq[Sequence], logits: torch.Tensor) -> list[int]:
        logits = apply_logit_bias(logits, [s.params.logit_bias for s in seqs])
        out = logits.float().argmax(dim=-1).tolist()  # greedy rows
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature > 0:
                out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, s.generator)[0])
        return out

    def _accept(self, seq: Sequence, token: int) -> Update:
        p = seq.params
        if token in p.stop_ids:
            self.remove(seq, "stop")
            return Update(seq, seq.stream.flush() if seq.stream else "", [], True)
        seq.out.append(token)
        text = seq.stream.push(token) if seq.stream else ""
        if seq.stream is not None and seq.stream.stopped:
            self.remove(seq, "stop")
        elif len(seq.out) >= p.max_new_tokens or len(seq.prompt) + len(seq.out) >= self.max_len:
            self.remove(seq, "length")
        if seq.finished and seq.stream is not None:
            text += seq.stream.flush()
        return Update(seq, text, [token], seq.finished)
