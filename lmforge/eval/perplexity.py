"""Perplexity and bits per byte of a causal LM on text.

Documents are encoded and joined into one stream, each starting with a separator (BOS for Llama-style
tokenizers, else EOS — how `lmforge prepare` joins pretraining documents). The stream is cut into
windows of ``seq_len`` predictions that overlap by one token, so every document token is predicted
exactly once with up to ``seq_len - 1`` tokens of context; separators are context only, never scored.

  perplexity    = exp(total NLL / scored tokens)
  bits per byte = total NLL / (ln 2 · UTF-8 bytes of the documents)

Bits per byte does not depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.config import UserError
from lmforge.models.transformer import logits_at
from lmforge.tokenizer.chat_template import encode_text, uses_bos


def token_stream(tokenizer, texts: Sequence[str]) -> tuple[list[int], list[bool]]:
    """(ids, scored): every document after its separator; ``scored`` is False on separators."""
    sep = tokenizer.bos_id if uses_bos(tokenizer) else getattr(tokenizer, "eos_id", None)
    ids: list[int] = []
    scored: list[bool] = []
    for text in texts:
        if sep is not None:
            ids.append(sep)
            scored.append(False)
        doc = encode_text(tokenizer, text)
        ids += doc
        scored += [True] * len(doc)
    if sep is None and scored:
        scored[0] = False  # without a separator the first token has no context
    return ids, scored


def _chunked_nll(logits_of, y: torch.Tensor, w: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ −log p(y) over the scored positions ``w`` (B, T), ``chunk`` positions of fp32 logits at a time."""
    rows, cols = w.nonzero(as_tuple=True)  # only scored positions reach the head
    step = chunk or max(int(rows.numel()), 1)
    total = torch.zeros((), dtype=torch.float64, device=y.device)
    for i in range(0, rows.numel(), step):
        r, c = rows[i:i + step], cols[i:i + step]
        total += F.cross_entropy(logits_of((r, c)).float(), y[r, c], reduction="sum").double()
    return total


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], seq_len: int | None = None, batch_size: int = 8,
               progress=None, chunk: int = 1024) -> dict[str, float]:
    """``chunk``: positions per piece of the LM head + cross-entropy (0 = the whole batch at once)."""
    cfg = model.cfg
    if not cfg.causal or not cfg.lm_head:
        raise UserError("perplexity needs a causal language model with an LM head; this model is an "
                        "encoder or a backbone without one")
    seq_len = seq_len or cfg.max_seq_len
    if seq_len < 1 or seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len={seq_len} must be between 1 and the model's max_seq_len={cfg.max_seq_len}")
    ids, scored = token_stream(tokenizer, texts)
    if len(ids) < 2:
        raise UserError("the text encodes to fewer than 2 tokens; nothing to score")
    device = next(model.parameters()).device
    stream = torch.tensor(ids, dtype=torch.long)
    weight = torch.tensor(scored, dtype=torch.bool)
    starts = list(range(0, len(ids) - 1, seq_len))
    if progress is not None:
        progress.total = len(starts)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        full = [s for s in starts if s + seq_len + 1 <= len(ids)]
        tail = [s for s in starts if s + seq_len + 1 > len(ids)]
        groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
        for group in groups:
            n = min(seq_len, len(ids) - 1 - group[0])
            x = torch.stack([stream[s:s + n] for s in group]).to(device)
            y = torch.stack([stream[s + 1:s + n + 1] for s in group]).to(device)
            w = torch.stack([weight[s + 1:s + n + 1] for s in group]).to(device)
            # chunks of positions through the LM head: never the (B, T, V) logits of the whole batch
            nll += float(logits_at(model, x, lambda logits_of, y=y, w=w: _chunked_nll(logits_of, y, w, chunk)))
            count += int(w.sum())
            if progress is not None:
                progress.update(len(group))
    finally:
        model.train(was_training)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if count == 0:
        raise UserError("no token was scored; the text is too short")
    return {
        "perplexity": math.exp(nll / count),
        "bits_per_byte": nll / (math.log(2) * n_bytes),
        "nll_per_token": nll / count,
        "tokens": count,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / count,
        "documents": len(texts),
        "seq_len": seq_len,
    }
