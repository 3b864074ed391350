"""Continuous batching over a paged KV cache: sequences join and leave a running batch between steps.

`ContinuousBatcher` owns no thread: a caller (the server's engine thread) calls `add` to queue a sequence,
`step` to run one engine iteration, and `remove` to drop a sequence early (a client went away). One step:

1. admit queued sequences while there is a free slot (``n_slots`` sequences at most) and the pool has the
   blocks their tokens need, taking the blocks of any cached prefix instead of recomputing it;
2. plan the step's tokens: one for every decoding sequence, and chunks of the prompts still being
   prefilled up to the per-step token budget ``prefill_chunk`` (at least one block's worth), so a long
   prompt is spread over several steps and the running streams' inter-token latency stays bounded;
3. take the blocks the planned tokens need; when the pool is empty, the most recently admitted sequence is
   *preempted*: its blocks are given back and it waits again, to be recomputed (from its prompt and the
   tokens it has produced, its full blocks often still in the prefix cache) when blocks free up;
4. one forward for all decoding sequences (a row each, positions per row), one right-padded forward for
   the chunks of prompts with nothing cached yet, one forward per other prefill chunk;
   sample, and finished sequences leave at once.

Each sequence keeps its own sampling settings and seeded generator, so its output does not depend on which
other sequences share the batch: a greedy sequence served in a batch produces the same tokens as served
alone, and as `lmforge.generate.engine.generate`.
"""

from __future__ import annotations

import itertools
import os
import random
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from lmforge.generate.engine import last_logits
from lmforge.generate.paged import PagedKVCache, PoolExhausted, block_hash
from lmforge.generate.sampling import apply_logit_bias, check_sampling, sample_next
from lmforge.generate.text_stream import TextStream
from lmforge.models.transformer import logits_at

DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block
DEFAULT_PREFILL_CHUNK = 256  # tokens per step (decode rows included) before a prompt's prefill is split


def serving_threads() -> int:
    """Torch intra-op threads for a server: every CPU core this process may use but one, which is left to
    the HTTP event loop and the tokenizer (at least one). Measured on a 2-core machine under load, two
    intra-op threads made a decode step 30x slower than one (their barriers wait for a core), and one core
    left free keeps streaming responsive; pass ``--threads`` to choose."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(cores - 1, 1)


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
    """One request's state: prompt, sampling settings, generated ids and text, how it ended, and the KV
    blocks it holds (``blocks``; ``cached`` of its tokens have their keys and values there)."""

    prompt: list[int]
    params: SamplingParams
    tokenizer: object = None
    id: int = field(default_factory=lambda: next(_ids))
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop id or string) | "length" | "cancelled"
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    blocks: list[int] = field(default_factory=list)
    cached: int = 0
    hashes: list[bytes] = field(default_factory=list)  # prefix-cache identities of its first full blocks
    preemptions: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out


@dataclass
class Update:
    """What one call produced for one sequence: newly final text (may be "") and the ids behind it."""

    seq: Sequence
    text: str
    token_ids: list[int]
    finished: bool


class ContinuousBatcher:
    """``n_slots``: sequences running at once; ``max_len``: tokens per sequence (prompt + reply; default
    the model's context); ``kv_blocks`` x ``block_size``: the pool (default: every slot at ``max_len``);
    ``prefill_chunk``: tokens per step; ``prefix_cache``: share full blocks of identical prefixes."""

    def __init__(self, model, tokenizer=None, n_slots: int = 8, max_len: int | None = None, *,
                 kv_blocks: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 prefill_chunk: int | None = None, prefix_cache: bool = True):
        cfg = model.cfg
        if not cfg.causal or not cfg.lm_head:
            raise ValueError("continuous batching needs a causal model with an LM head (this one is an encoder)")
        if n_slots < 1:
            raise ValueError(f"n_slots={n_slots} must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        p = next(model.parameters())
        self.device = p.device
        self.max_len = max_len or cfg.max_seq_len
        per_seq = -(-self.max_len // block_size)
        kv_blocks = kv_blocks or n_slots * per_seq
        if kv_blocks < per_seq:
            raise ValueError(f"a KV pool of {kv_blocks} blocks x {block_size} tokens cannot hold one "
                             f"{self.max_len}-token sequence; give it at least {per_seq} blocks or a shorter max_len")
        self.cache = PagedKVCache(cfg, kv_blocks, block_size, device=p.device, dtype=p.dtype)
        self.n_slots = n_slots
        self.prefill_chunk = max(prefill_chunk or DEFAULT_PREFILL_CHUNK, 1)
        self.prefix_cache = prefix_cache
        self.running: list[Sequence] = []  # hold blocks, in admission order
        self.waiting: deque[Sequence] = deque()  # added (or preempted), no blocks yet
        self.preemptions = 0

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def active(self) -> list[Sequence]:
        return self.running + list(self.waiting)

    @property
    def free_slots(self) -> int:
        return max(self.n_slots - len(self.running) - len(self.waiting), 0)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; a later `step` prefills it (in chunks) and samples its first token."""
        if not seq.prompt:
            raise ValueError("every prompt needs at least one token")
        if len(seq.prompt) + 1 > self.max_len:
            raise ValueError(f"prompt of {len(seq.prompt)} tokens leaves no room in a {self.max_len}-token context")
        seed = seq.params.seed % (1 << 63) if seq.params.seed is not None else random.getrandbits(63)
        seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        seq.stream = TextStream(self.tokenizer, seq.params.stop_strings) if self.tokenizer is not None else None
        self.waiting.append(seq)

    def remove(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Take ``seq`` out of the batch (its blocks go back to the pool before the next step)."""
        if seq in self.running:
            self.running.remove(seq)
            self._drop_blocks(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.finish_reason is None:
            seq.finish_reason = reason

    def _drop_blocks(self, seq: Sequence) -> None:
        self.cache.release(seq.blocks)
        seq.blocks, seq.cached, seq.hashes = [], 0, []

    # ---- admission, blocks, preemption ---------------------------------------------------------------
    def _prefix_hashes(self, tokens: list[int]) -> list[bytes]:
        """Hashes of the full blocks of ``tokens`` except the last token (whose logits must be computed)."""
        bs, out, h = self.cache.block_size, [], b""
        for i in range((len(tokens) - 1) // bs):
            h = block_hash(h, tokens[i * bs:(i + 1) * bs])
            out.append(h)
        return out

    def _admit(self) -> None:
        bs = self.cache.block_size
        while self.waiting and len(self.running) < self.n_slots:
            seq = self.waiting[0]
            tokens = seq.tokens
            need = -(-(len(tokens) + 1) // bs)  # every token it holds and the next one
            if need > self.cache.available:
                return  # first come, first served: later ones wait too
            self.waiting.popleft()
            if self.prefix_cache:
                for h in self._prefix_hashes(tokens):
                    b = self.cache.lookup(h)
                    if b is None:
                        break
                    seq.blocks.append(b)
                    seq.hashes.append(h)
                seq.cached = len(seq.blocks) * bs
            self.running.append(seq)

    def _preempt(self) -> Sequence:
        victim = self.running.pop()  # the most recently admitted
        self._drop_blocks(victim)
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _reserve(self, plan: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Blocks for every planned (sequence, tokens); sequences preempted to make room leave the plan."""
        bs = self.cache.block_size
        i = 0
        while i < len(plan):
            seq, n = plan[i]
            try:
                while len(seq.blocks) * bs < seq.cached + n:
                    seq.blocks.append(self.cache.allocate())
                i += 1
            except PoolExhausted:
                victim = self._preempt()
                at = next((j for j, (s, _) in enumerate(plan) if s is victim), None)
                if at is not None:
                    del plan[at]
                    if at < i:
                        i -= 1
                # (victim is seq: plan[i] is now the next sequence)
        return plan

    def _register(self, seq: Sequence) -> None:
        bs = self.cache.block_size
        tokens = None
        while len(seq.hashes) < seq.cached // bs:
            i = len(seq.hashes)
            tokens = tokens or seq.tokens
            h = block_hash(seq.hashes[-1] if seq.hashes else b"", tokens[i * bs:(i + 1) * bs])
            self.cache.register(seq.blocks[i], h)
            seq.hashes.append(h)

    # ---- one engine iteration ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Update]:
        """Admit what fits, then one decode forward for every decoding sequence and prefill chunks within
        the token budget; finished sequences leave the batch."""
        self._admit()
        if not self.running:
            return []
        decode = [s for s in self.running if len(s.prompt) + len(s.out) - s.cached == 1]
        budget = max(self.prefill_chunk - len(decode), self.cache.block_size)
        plan: list[tuple[Sequence, int]] = [(s, 1) for s in decode]
        for s in self.running:
            pending = len(s.prompt) + len(s.out) - s.cached
            if pending > 1 and budget > 0:
                n = min(pending, budget)
                plan.append((s, n))
                budget -= n
        plan = self._reserve(plan)
        updates: list[Update] = []
        decode = [s for s, n in plan if n == 1 and len(s.prompt) + len(s.out) - s.cached == 1]
        if decode:
            view = self.cache.decode([s.blocks for s in decode], [s.cached for s in decode])
            tokens = torch.tensor([[s.out[-1] if s.out else s.prompt[-1]] for s in decode], device=self.device)
            logits = self.model(tokens, positions=view.pos[:, None], mask=view.key_mask, cache=view)[:, -1]
            for s in decode:
                s.cached += 1
            updates += self._finish_tokens(decode, logits)
        done = {id(s) for s in decode}
        fresh = [(s, n) for s, n in plan if id(s) not in done and s.cached == 0]
        if len(fresh) > 1:  # prompts with nothing cached: one padded forward for all of them
            updates += self._prefill_fresh(fresh)
            done |= {id(s) for s, _ in fresh}
        for s, n in plan:
            if id(s) in done:
                continue
            tokens = s.tokens[s.cached:s.cached + n]
            positions = torch.arange(s.cached, s.cached + n, device=self.device)[None]
            logits = last_logits(self.model, torch.tensor([tokens], device=self.device), positions=positions,
                                 cache=self.cache.prefill(s.blocks, s.cached, n))  # (1, V)
            s.cached += n
            if s.cached == len(s.prompt) + len(s.out):  # the whole prompt is in: its next token
                updates += self._finish_tokens([s], logits)
            elif self.prefix_cache:
                self._register(s)
        return updates

    def _prefill_fresh(self, plan: list[tuple[Sequence, int]]) -> list[Update]:
        counts = [n for _, n in plan]
        width = max(counts)
        tokens = torch.tensor([s.tokens[:n] + [0] * (width - n) for s, n in plan], device=self.device)
        last = torch.tensor(counts, device=self.device) - 1
        rows = torch.arange(len(plan), device=self.device)
        logits = logits_at(self.model, tokens, lambda logits_of: logits_of((rows, last)),
                           cache=self.cache.prefill_fresh([s.blocks for s, _ in plan], counts))  # (B, V)
        complete = []
        for i, (s, n) in enumerate(plan):
            s.cached = n
            if s.cached == len(s.prompt) + len(s.out):
                complete.append(i)
            elif self.prefix_cache:
                self._register(s)
        if not complete:
            return []
        return self._finish_tokens([plan[i][0] for i in complete], logits[complete])

    def _finish_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Update]:
        if self.prefix_cache:
            for s in seqs:
                self._register(s)
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
