"""Fine-tuning data: readers and chat encoding with assistant-only labels (batching: `batching.py`).

Readers turn files into instruction examples — Alpaca (``instruction``, ``input``, ``output``), chat
(``messages: [{role, content}]``), ShareGPT (``conversations: [{from, value}]``) and prompt/completion
pairs — from ``.json`` (an array) or ``.jsonl``; every error names the file and line. The file readers
themselves are `lmforge.data.records`; labelled classification data is `lmforge.data.labelled`.

Encoding (`encode_example`) renders a conversation with the chat template and labels only the assistant
tokens (+ the EOS closing each assistant turn); everything else is ``IGNORE_INDEX``. Batches hold
*shifted* targets: ``labels[b, t]`` is the token to predict after ``tokens[b, t]``, so the loss is
``cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)``.

Batching (`SFTBatchIterator`): either *packing* — several short examples per fixed-length row, positions
restarting at 0 for each example and a block-diagonal attention mask from document ids so no example
attends to another — or *length-grouped* padding. The global order of rows is a function of the seed
and epoch only; each rank takes its slice of every global batch, and ``state_dict()`` /
``load_state_dict()`` resume exactly, also on a different number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import UserError
from lmforge.data.records import DataError, as_text, read_records
from lmforge.tokenizer.chat_template import IGNORE_INDEX, encode_chat, encode_text, uses_bos

FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}


# ================================================================================================
# Instruction examples
# ================================================================================================
@dataclass
class SFTExample:
    """One training example: a conversation, or a raw prompt/completion pair (no chat template)."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    completion: str | None = None
    where: str = ""  # "file:line", for error messages


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "messages" in record:
            return "chat"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
    return ""


def _field(record: dict, name: str, columns: dict[str, str], where: str, required: bool = True,
           default: Any = "") -> Any:
    key = columns.get(name, name)
    if key not in record:
        if required:
            keys = ", ".join(sorted(map(str, record))[:8])
            raise DataError(f"{where}: record has no '{key}' field (it has: {keys}); "
                            f"set the column mapping or data.format")
        return default
    value = record[key]
    return default if value is None else value


def parse_messages(raw: list, where: str) -> list[dict[str, str]]:
    """``[{role, content}, ...]`` as plain {role, content} dicts: each an object, a known role, text content."""
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role '{m['role']}'; use one of {', '.join(ROLES)}")
        messages.append({"role": m["role"], "content": as_text(m["content"], where, f"message {i} content")})
    return messages


def _check_messages(messages: list[dict[str, str]], where: str) -> list[dict[str, str]]:
    if not messages:
        raise DataError(f"{where}: the conversation is empty")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first (message {i})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return messages


def record_to_example(record: Any, fmt: str = "auto", where: str = "",
                      columns: dict[str, str] | None = None) -> SFTExample:
    """One JSON record -> `SFTExample`. ``columns`` renames fields (e.g. ``{"instruction": "zh_instruction"}``)."""
    columns = dict(columns or {})
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        probe = {k: record.get(columns.get(k, k)) for k in
                 ("messages", "conversations", "instruction", "output", "prompt", "completion")}
        fmt = detect_format({k: v for k, v in probe.items() if v is not None})
        if not fmt:
            keys = ", ".join(sorted(map(str, record))[:8])
            raise DataError(f"{where}: cannot tell the data format from the fields ({keys}); set data.format "
                            "to alpaca | chat | sharegpt | prompt_completion")
    if fmt == "alpaca":
        instruction = as_text(_field(record, "instruction", columns, where), where, "instruction")
        inp = as_text(_field(record, "input", columns, where, required=False), where, "input")
        output = as_text(_field(record, "output", columns, where), where, "output")
        system = as_text(_field(record, "system", columns, where, required=False), where, "system")
        messages = [{"role": "system", "content": system}] if system else []
        for turn in _field(record, "history", columns, where, required=False, default=[]) or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataError(f"{where}: history must be a list of [instruction, response] pairs")
            messages += [{"role": "user", "content": as_text(turn[0], where, "history")},
                         {"role": "assistant", "content": as_text(turn[1], where, "history")}]
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return SFTExample(messages=_check_messages(messages, where), where=where)
    if fmt == "chat":
        raw = _field(record, "messages", columns, where)
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return SFTExample(messages=_check_messages(parse_messages(raw, where), where), where=where)
    if fmt == "sharegpt":
        raw = _field(record, "conversations", columns, where)
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        system = _field(record, "system", columns, where, required=False)
        messages = [{"role": "system", "content": as_text(system, where, "system")}] if system else []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: conversation turn {i} must be an object with 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {i} is from '{m['from']}'; use human, gpt or system")
            messages.append({"role": role, "content": as_text(m["value"], where, f"turn {i} value")})
        return SFTExample(messages=_check_messages(messages, where), where=where)
    if fmt == "prompt_completion":
        prompt = as_text(_field(record, "prompt", columns, where), where, "prompt")
        completion = as_text(_field(record, "completion", columns, where), where, "completion")
        return SFTExample(prompt=prompt, completion=completion, where=where)
    raise DataError(f"data.format='{fmt}' is not one of {', '.join(FORMATS)}")


def load_sft_examples(paths: str | os.PathLike | Sequence[str | os.PathLike], fmt: str = "auto",
                      columns: dict[str, str] | None = None, max_examples: int | None = None) -> list[SFTExample]:
    """Read instruction examples from one or more json/jsonl files."""
    if fmt not in FORMATS:
        raise DataError(f"data.format='{fmt}' is not one of {', '.join(FORMATS)}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[SFTExample] = []
    for path in paths:
        for line, record in read_records(path):
            out.append(record_to_example(record, fmt, f"{path}:{line}", columns))
            if max_examples is not None and len(out) >= max_examples:
                return out
    if not out:
        raise DataError(f"no examples in {', '.join(map(str, paths))}; the file(s) are empty")
    return out


# ================================================================================================
# Encoding
# ================================================================================================
@dataclass
class SFTDataset:
    """Encoded examples: token ids and aligned (unshifted) labels, plus what encoding dropped."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        """Positions each example fills in a batch row (inputs are ids[:-1], targets labels[1:])."""
        return [len(x) - 1 for x in self.input_ids]


def encode_example(tokenizer, example: SFTExample, template: str | None = None, max_len: int | None = None
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: chat examples through the chat template (assistant-only
    labels); prompt/completion pairs as raw text (prompt untrained — after BOS when the chat template
    uses one —, completion + EOS trained). With ``max_len`` a conversation is encoded only as far as
    needed to know its first ``max_len`` ids (and that there are more): see `encode_chat`."""
    if example.messages is not None:
        return encode_chat(tokenizer, example.messages, template, max_len=max_len)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token; SFT needs one to end each completion")
    bos = [tokenizer.bos_id] if uses_bos(tokenizer, template) else []
    prompt = bos + encode_text(tokenizer, example.prompt or "")
    completion = encode_text(tokenizer, example.completion or "") + [eos]
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def encode_examples(tokenizer, examples: Sequence[SFTExample], seq_len: int,
                    template: str | None = None) -> SFTDataset:
    """Encode every example; longer than ``seq_len + 1`` tokens -> cut at the end (counted); an example
    left with no trained target after the cut is dropped (counted). A conversation is cut before rendering
    what lies past ``seq_len + 1`` tokens, so the time is linear in what is kept, not in the record."""
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} is too short for fine-tuning; use at least 2 (typically 512-4096)")
    ids_out, labels_out = [], []
    stats = {"examples": len(examples), "truncated": 0, "dropped": 0, "tokens": 0, "trained_tokens": 0}
    for ex in examples:
        try:
            ids, labels = encode_example(tokenizer, ex, template, max_len=seq_len + 1)
        except UserError as e:
            raise DataError(f"{ex.where}: {e}") from None
        if len(ids) > seq_len + 1:
            ids, labels = ids[: seq_len + 1], labels[: seq_len + 1]
            stats["truncated"] += 1
        trained = sum(1 for t in labels[1:] if t != IGNORE_INDEX)
        if trained == 0:
            stats["dropped"] += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        stats["tokens"] += len(ids) - 1
        stats["trained_tokens"] += trained
    if not ids_out:
        raise DataError(f"every one of the {len(examples)} examples was dropped: none has an assistant token "
                        f"within seq_len={seq_len}; raise seq_len")
    return SFTDataset(ids_out, labels_out, stats)
