"""Preference pairs for DPO-family tuning and reward models: reading, encoding, batches.

Record shapes read from ``.json`` (an array) or ``.jsonl`` (detected per record):

* TRL's explicit prompt: ``{"prompt": P, "chosen": C, "rejected": R}`` — ``P`` a string or a list of
  ``{role, content}`` messages, ``C``/``R`` a string or a list holding the assistant reply;
* TRL's implicit prompt: ``{"chosen": [messages…], "rejected": [messages…]}`` — the shared leading
  messages are the prompt, the last (assistant) message of each is the reply;
* LLaMA-Factory ranking / ShareGPT: ``{"conversations": [{from, value}…], "chosen": {from, value},
  "rejected": {from, value}, "system": S?}`` (``messages`` with ``{role, content}`` works the same; a
  ``system`` turn may also lead the conversation).

Encoding: the prompt is rendered by the model's chat template with the assistant header
(`render_generation_prompt`); each reply is the text the template adds after that header, closed with EOS
(exactly as SFT's `encode_chat` labels an assistant turn). Both completions follow the *same* prompt ids.

Truncation (``L = seq_len + 1`` ids, i.e. ``seq_len`` model positions per row):
  1. if ``len(prompt) + max(len(chosen), len(rejected)) > L`` the prompt is cut first, keeping its last
     ``max_prompt_len`` tokens (the end holds the question and the assistant header);
  2. if it still does not fit, each completion is cut at its end to ``L - len(prompt)`` tokens;
  3. a pair left with an empty completion (a prompt of ``L`` tokens or more) is dropped.
A pair whose chosen and rejected replies are the same (both empty included) — as text, or as the tokens left
after the cut — teaches nothing (every pairwise loss sits at its constant, e.g. DPO's log 2 = 0.6931, with a
zero gradient) and is dropped too. ``stats`` counts the cut prompts, cut completions, pairs dropped for
lack of room (``dropped``) and identical pairs dropped (``identical``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.config import UserError
from lmforge.data.epochs import check_batch_layout
from lmforge.data.records import DataError, read_records
from lmforge.tokenizer.chat_template import (
    IGNORE_INDEX,
    _prefix,
    encode_prompt,
    encode_text,
    render,
    token_texts,
)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "chatgpt": "assistant", "system": "system"}


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]  # messages before the reply (system?, user, [assistant, user]…)
    chosen: str
    rejected: str
    where: str = ""


# ================================================================================================
# Reading
# ================================================================================================
def _message(m: Any, where: str, what: str) -> dict[str, str]:
    if isinstance(m, dict) and "role" in m and "content" in m:
        role, content = m["role"], m["content"]
    elif isinstance(m, dict) and "from" in m and "value" in m:
        role, content = m["from"], m["value"]
    else:
        raise DataError(f"{where}: {what} must be an object with role/content (or from/value)")
    mapped = _ROLES.get(str(role).lower())
    if mapped is None:
        raise DataError(f"{where}: {what} has role '{role}'; use system, user/human or assistant/gpt")
    if not isinstance(content, str):
        raise DataError(f"{where}: {what} content must be a string, got {type(content).__name__}")
    return {"role": mapped, "content": content}


def _messages(raw: Any, where: str, what: str) -> list[dict[str, str]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise DataError(f"{where}: '{what}' must be a string or a list of messages")
    return [_message(m, where, f"{what}[{i}]") for i, m in enumerate(raw)]


def _reply(raw: Any, where: str, what: str) -> str:
    """A completion: a string, one message, or a list whose last message is the assistant reply."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: '{what}' must be a string, a message or a non-empty list of messages")
    msgs = [_message(m, where, f"{what}[{i}]") for i, m in enumerate(raw)]
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: '{what}' must hold exactly one assistant message (the reply) after the prompt")
    return msgs[0]["content"]


def _check_prompt(prompt: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user turn (the reply answers it)")
    for i, m in enumerate(prompt):
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (message {i})")
    return prompt


def record_to_pair(record: Any, where: str = "") -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        keys = ", ".join(sorted(map(str, record))[:8])
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (it has: {keys}); see the "
                        "Alignment section of the README for the accepted shapes")
    system = record.get("system")
    if "prompt" in record:
        prompt = _messages(record["prompt"], where, "prompt")
        chosen, rejected = _reply(record["chosen"], where, "chosen"), _reply(record["rejected"], where, "rejected")
    elif "conversations" in record or "messages" in record:
        key = "conversations" if "conversations" in record else "messages"
        prompt = _messages(record[key], where, key)
        chosen, rejected = _reply(record["chosen"], where, "chosen"), _reply(record["rejected"], where, "rejected")
    else:  # implicit prompt: two full conversations sharing their leading messages
        c, r = _messages(record["chosen"], where, "chosen"), _messages(record["rejected"], where, "rejected")
        if len(c) < 2 or c[:-1] != r[:-1] or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise DataError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be conversations that differ "
                            "only in their last (assistant) message")
        prompt, chosen, rejected = c[:-1], c[-1]["content"], r[-1]["content"]
    if system:
        if not isinstance(system, str):
            raise DataError(f"{where}: 'system' must be a string")
        if prompt and prompt[0]["role"] == "system":
            raise DataError(f"{where}: the record has both a 'system' field and a leading system message")
        prompt = [{"role": "system", "content": system}, *prompt]
    return PreferencePair(_check_prompt(prompt, where), chosen, rejected, where)


def load_pairs(paths: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None
               ) -> list[PreferencePair]:
    """Every pair of the files (json array or jsonl), at most ``limit``; errors name the file and line."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[PreferencePair] = []
    for p in paths:
        for line, record in read_records(p):
            out.append(record_to_pair(record, f"{p}:{line}"))
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"no preference pairs in {', '.join(map(str, paths))}")
    return out


# ================================================================================================
# Encoding
# ================================================================================================
def encode_reply(tokenizer, prompt: list[dict[str, str]], reply: str, template: str) -> list[int]:
    """Token ids the chat template adds for ``reply`` after the generation prompt, closed by EOS (the
    tokens SFT trains for an assistant turn)."""
    bos_text, eos_text = token_texts(tokenizer)
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is None:
        raise UserError("the tokenizer has no EOS token; preference tuning closes each reply with EOS")
    header = render(template, prompt, True, bos_text, eos_text)
    full = render(template, [*prompt, {"role": "assistant", "content": reply}], False, bos_text, eos_text)
    text = _prefix(full, header, "the assistant reply")
    start = text.find(reply) if reply else 0
    k = text.find(eos_text, max(start, 0) + len(reply)) if eos_text else -1
    text = text[:k] if k >= 0 else text.rstrip()
    return encode_text(tokenizer, text) + [eos_id]


@dataclass
class EncodedPairs:
    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    where: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int, max_prompt_len: int
                  ) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Apply the module's truncation rules. Returns (prompt, chosen, rejected, prompt_cut, completion_cut)."""
    limit = seq_len + 1
    prompt_cut = completion_cut = False
    if len(prompt) + max(len(chosen), len(rejected)) > limit and len(prompt) > max_prompt_len:
        prompt, prompt_cut = prompt[-max_prompt_len:], True
    room = limit - len(prompt)
    if max(len(chosen), len(rejected)) > room:
        chosen, rejected, completion_cut = chosen[:max(room, 0)], rejected[:max(room, 0)], True
    return prompt, chosen, rejected, prompt_cut, completion_cut


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], seq_len: int, template: str,
                 max_prompt_len: int | None = None) -> EncodedPairs:
    if max_prompt_len is None:
        max_prompt_len = seq_len // 2
    out = EncodedPairs([], [], [], [], {"pairs": len(pairs), "prompt_truncated": 0, "completion_truncated": 0,
                                        "dropped": 0, "identical": 0})
    for p in pairs:
        if p.chosen == p.rejected:  # nothing to prefer (both empty included): a constant loss, no gradient
            out.stats["identical"] += 1
            continue
        try:
            prompt = encode_prompt(tokenizer, p.prompt, template)
            chosen = encode_reply(tokenizer, p.prompt, p.chosen, template)
            rejected = encode_reply(tokenizer, p.prompt, p.rejected, template)
        except UserError as e:
            raise DataError(f"{p.where}: {e}") from None
        prompt, chosen, rejected, pc, cc = truncate_pair(prompt, chosen, rejected, seq_len, max_prompt_len)
        out.stats["prompt_truncated"] += pc
        out.stats["completion_truncated"] += cc
        if not chosen or not rejected or not prompt:
            out.stats["dropped"] += 1
            continue
        if chosen == rejected:  # the replies differ only past data.seq_len
            out.stats["identical"] += 1
            continue
        out.prompt.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
        out.where.append(p.where)
    if not out.prompt:
        same, room = out.stats["identical"], out.stats["dropped"]
        if not room:
            raise DataError(f"every one of the {len(pairs)} pairs was dropped: chosen and rejected are the same "
                            f"(within data.seq_len={seq_len}); preference pairs need two different replies")
        raise DataError(f"every one of the {len(pairs)} pairs was dropped: "
                        + (f"{same} have the same chosen and rejected reply, {room} " if same else "")
                        + f"no prompt leaves room for a reply within data.seq_len={seq_len}; raise data.seq_len "
                        "or lower dpo.max_prompt_len")
    return out


def identical_warning(stats: dict[str, int], split: str) -> str | None:
    """The one-line warning for the pairs `encode_pairs` dropped as identical, or None when there are none."""
    n = stats.get("identical", 0)
    if not n:
        return None
    return (f"warning: {split}: dropped {n} of {stats['pairs']} preference pairs whose chosen and rejected replies "
            "are the same (or both empty): they teach nothing (the loss stays at its constant, 0.6931 for DPO)")


# ================================================================================================
# Batches
# ================================================================================================
def _rows(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, multiple: int = 8
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded model inputs (B, T) and shifted targets (B, T): only completion tokens are targets."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    longest = max(len(s) for s in seqs) - 1
    T = -(-longest // multiple) * multiple
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        s = p + c
        tokens[i, :len(s) - 1] = torch.tensor(s[:-1])
        labels[i, len(p) - 1:len(s) - 1] = torch.tensor(c)  # the target after position t is s[t + 1]
    return tokens, labels


def collate_pairs(data: EncodedPairs, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch dict of pairs ``idx``: ``chosen_tokens``/``chosen_labels`` and ``rejected_*`` (B, T) each,
    ``index`` (B,) — the pairs' positions in ``data`` (to look up precomputed reference log-probs) — and
    ``input_tokens`` (B,), the non-padding inputs of both rows of each pair (the Trainer's tokens count)."""
    prompts = [data.prompt[i] for i in idx]
    ct, cl = _rows(prompts, [data.chosen[i] for i in idx], pad_id)
    rt, rl = _rows(prompts, [data.rejected[i] for i in idx], pad_id)
    real = [len(p) + len(data.chosen[i]) - 1 + len(p) + len(data.rejected[i]) - 1 for p, i in zip(prompts, idx)]
    return {"chosen_tokens": ct, "chosen_labels": cl, "rejected_tokens": rt, "rejected_labels": rl,
            "index": torch.tensor(list(idx), dtype=torch.long),
            "input_tokens": torch.tensor(real, dtype=torch.long)}  # both replies' real inputs: the throughput count


class PairBatches:
    """Deterministic, resumable batches of pairs for the Trainer (the pairs version of `LabelledBatches`).

    Every epoch reorders the pairs with a generator seeded by ``(seed, epoch)``; a global batch is
    ``global_batch`` consecutive pairs of that order and rank ``r`` takes its contiguous slice, so the
    global stream does not depend on the world size. The last incomplete global batch of an epoch is
    dropped. ``extra(batch)`` may add tensors (the precomputed reference log-probs); ``collate`` builds a
    batch from pair indices (default `collate_pairs`; the reward model uses whole sequences).
    """

    def __init__(self, data: EncodedPairs, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 pad_id: int = 0, extra=None, collate=None):
        check_batch_layout(len(data), global_batch, world_size, "pairs")
        self.data, self.global_batch, self.rank, self.world_size = data, global_batch, rank, world_size
        self.seed, self.pad_id, self.extra = seed, pad_id, extra
        self.collate = collate or collate_pairs
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.global_batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        import numpy as np

        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._order = None
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data)).tolist()
        local = self.global_batch // self.world_size
        start = self.batch_in_epoch * self.global_batch + self.rank * local
        idx = self._order[start:start + local]
        self.batch_in_epoch += 1
        batch = self.collate(self.data, idx, self.pad_id)
        if self.extra is not None:
            batch.update(self.extra(batch))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch, "pairs": len(self.data),
                "samples_seen": (self.epoch * self.batches_per_epoch + self.batch_in_epoch) * self.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"seed": self.seed, "global_batch": self.global_batch, "pairs": len(self.data)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"cannot resume the preference data stream: checkpoint has {key}={state.get(key)!r}, "
                                f"this run has {value!r}; resume with the same data, seed and train.global_batch")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._order = None


def fixed_batches(data: EncodedPairs, batch_size: int, pad_id: int, max_batches: int | None = None, extra=None
                  ) -> list[dict[str, torch.Tensor]]:
    """Dev batches in a fixed order (longest pairs first), at most ``max_batches``."""
    order = sorted(range(len(data)), key=lambda i: (-(len(data.prompt[i]) + max(len(data.chosen[i]),
                                                                                 len(data.rejected[i]))), i))
    out = []
    for s in range(0, len(order), batch_size):
        if max_batches and len(out) >= max_batches:
            break
        batch = collate_pairs(data, order[s:s + batch_size], pad_id)
        if extra is not None:
            batch.update(extra(batch))
        out.append(batch)
    return out


__all__ = ["EncodedPairs", "PairBatches", "PreferencePair", "collate_pairs", "encode_pairs", "encode_reply",
           "fixed_batches", "identical_warning", "load_pairs", "record_to_pair", "truncate_pair"]
