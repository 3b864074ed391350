"""Fine-tuning data: readers and chat encoding with assistant-only labels (batching: `batching.py`).

Readers turn files into examples:
  * instruction data — Alpaca (``instruction``, ``input``, ``output``), chat (``messages: [{role, content}]``),
    ShareGPT (``conversations: [{from, value}]``) and prompt/completion pairs — from ``.json`` (an array) or
    ``.jsonl``; every error names the file and line;
  * labelled classification data (text + label) from TSV / CSV (with a header, or column numbers) and jsonl.

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

import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import UserError

IGNORE_INDEX = -100
FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "system": "system"}


class DataError(UserError):
    """Malformed fine-tuning data; the message names the file and line."""


# ================================================================================================
# Reading records
# ================================================================================================
def check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{path}' does not exist; check data.train / data.dev / --data")
    return p


def read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 ({e.reason}); re-save the file as UTF-8") from None


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` from a JSON array file or a JSON Lines file (chosen by content)."""
    p = check_file(path)
    text = read_text(p)
    stripped = text.lstrip()
    if p.suffix.lower() == ".jsonl" or not stripped.startswith("["):
        yield from _read_jsonl(p, text)
    else:
        yield from _read_json_array(p, text)


def _read_jsonl(p: Path, text: str) -> Iterator[tuple[int, Any]]:
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: invalid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                            "file must be one JSON object") from None


def _read_json_array(p: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walk a top-level JSON array element by element so each record keeps its line number."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def fail(pos: int, msg: str):
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"{p}:{line}: {msg}")

    pos = text.index("[") + 1
    n = len(text)
    expect_value = True
    line, counted = 1, 0  # newlines counted incrementally: linear time on large files
    while True:
        while pos < n and text[pos] in ws:
            pos += 1
        if pos >= n:
            fail(pos, "the JSON array is not closed with ']'; the file looks truncated")
        if text[pos] == "]":
            rest = text[pos + 1:].strip()
            if rest:
                fail(pos + 1, "unexpected text after the closing ']' of the JSON array")
            return
        if not expect_value:
            if text[pos] != ",":
                fail(pos, "expected ',' or ']' between records of the JSON array")
            pos += 1
            expect_value = True
            continue
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e.pos, f"invalid JSON ({e.msg})")
        line += text.count("\n", counted, pos)
        counted = pos
        yield line, obj
        pos, expect_value = end, False


def read_table(path: str | os.PathLike, delimiter: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, row)`` for the non-blank rows of a TSV/CSV file (the header, if any, included).

    ``.tsv`` / ``.txt`` are tab-separated without quoting (GLUE style); ``.csv`` is comma-separated with
    standard quoting (fields may span lines; ``line`` is where the row ends).
    """
    p = check_file(path)
    text = read_text(p)
    if delimiter is None:
        delimiter = "," if p.suffix.lower() == ".csv" else "\t"
    quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, quoting=quoting)

    def rows():
        for row in reader:
            if row and any(c.strip() for c in row):
                yield reader.line_num, row

    return rows()


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


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


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
        instruction = _text(_field(record, "instruction", columns, where), where, "instruction")
        inp = _text(_field(record, "input", columns, where, required=False), where, "input")
        output = _text(_field(record, "output", columns, where), where, "output")
        system = _text(_field(record, "system", columns, where, required=False), where, "system")
        messages = [{"role": "system", "content": system}] if system else []
        for turn in _field(record, "history", columns, where, required=False, default=[]) or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataError(f"{where}: history must be a list of [instruction, response] pairs")
            messages += [{"role": "user", "content": _text(turn[0], where, "history")},
                         {"role": "assistant", "content": _text(turn[1], where, "history")}]
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return SFTExample(messages=_check_messages(messages, where), where=where)
    if fmt == "chat":
        raw = _field(record, "messages", columns, where)
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: message {i} must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has role '{m['role']}'; use one of {', '.join(ROLES)}")
            messages.append({"role": m["role"], "content": _text(m["content"], where, f"message {i} content")})
        return SFTExample(messages=_check_messages(messages, where), where=where)
    if fmt == "sharegpt":
        raw = _field(record, "conversations", columns, where)
        if not isinstance(raw, list):
            raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        system = _field(record, "system", columns, where, required=False)
        messages = [{"role": "system", "content": _text(system, where, "system")}] if system else []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: conversation turn {i} must be an object with 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: turn {i} is from '{m['from']}'; use human, gpt or system")
            messages.append({"role": role, "content": _text(m["value"], where, f"turn {i} value")})
        return SFTExample(messages=_check_messages(messages, where), where=where)
    if fmt == "prompt_completion":
        prompt = _text(_field(record, "prompt", columns, where), where, "prompt")
        completion = _text(_field(record, "completion", columns, where), where, "completion")
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
# Labelled classification examples
# ================================================================================================
@dataclass
class LabelledExample:
    text: str
    label: str
    where: str = ""


TEXT_FIELDS = ("text", "sentence", "review", "content", "title", "question")


def load_labelled(path: str | os.PathLike, text_field: str | int | None = None,
                  label_field: str | int = "label", max_examples: int | None = None,
                  delimiter: str | None = None) -> list[LabelledExample]:
    """Text + label examples from TSV/CSV (header row, or column numbers for header-less files) or jsonl.

    ``text_field`` defaults to the first of text / sentence / review / content / title / question.
    Column numbers (``0``, ``1`` or ``"1"``) mean the file has no header (e.g. THUCNews ``title<TAB>label``).
    Labels are kept as strings.
    """
    p = check_file(path)
    out: list[LabelledExample] = []
    if p.suffix.lower() in (".json", ".jsonl"):
        for line, rec in read_records(p):
            where = f"{p}:{line}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object with text and label fields")
            tf = text_field if text_field is not None else next((f for f in TEXT_FIELDS if f in rec), "text")
            for f in (tf, label_field):
                if f not in rec:
                    raise DataError(f"{where}: record has no '{f}' field (it has: {', '.join(sorted(rec))}); "
                                    "set data.text_field / data.label_field")
            out.append(LabelledExample(_text(rec[tf], where, str(tf)), str(rec[label_field]), where))
            if max_examples is not None and len(out) >= max_examples:
                break
    else:
        rows = read_table(p, delimiter)
        by_index = _is_index(label_field) and (text_field is None or _is_index(text_field))
        if by_index:
            ti, li = int(text_field if text_field is not None else 0), int(label_field)
        else:
            try:
                _, header = next(rows)
            except StopIteration:
                raise DataError(f"{p}: the file is empty") from None
            header = [h.strip() for h in header]
            tf = text_field if text_field is not None else next((f for f in TEXT_FIELDS if f in header), None)
            missing = [f for f in (tf, label_field) if f is None or str(f) not in header]
            if missing:
                raise DataError(f"{p}:1: header has no column '{missing[0] or 'text'}' (columns: "
                                f"{', '.join(header)}); set data.text_field / data.label_field, or column "
                                "numbers for a file without a header")
            ti, li = header.index(str(tf)), header.index(str(label_field))
        for line, row in rows:
            where = f"{p}:{line}"
            if len(row) <= max(ti, li):
                raise DataError(f"{where}: row has {len(row)} column(s), expected at least {max(ti, li) + 1}")
            out.append(LabelledExample(row[ti], row[li].strip(), where))
            if max_examples is not None and len(out) >= max_examples:
                break
    if not out:
        raise DataError(f"no labelled examples in '{p}'")
    return out


def _is_index(v: Any) -> bool:
    return isinstance(v, int) or (isinstance(v, str) and v.isdigit())


def label_list(examples: Iterable[LabelledExample]) -> list[str]:
    """Sorted distinct labels (numerically when all are integers: "2" before "10")."""
    labels = {e.label for e in examples}
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


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


def encode_example(tokenizer, example: SFTExample, template: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example: chat examples through the chat template (assistant-only
    labels); prompt/completion pairs as raw text (prompt untrained — after BOS when the chat template
    uses one —, completion + EOS trained)."""
    from lmforge.finetune.chat_template import encode_chat, encode_text, uses_bos

    if example.messages is not None:
        return encode_chat(tokenizer, example.messages, template)
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
    left with no trained target after the cut is dropped (counted)."""
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} is too short for fine-tuning; use at least 2 (typically 512-4096)")
    ids_out, labels_out = [], []
    stats = {"examples": len(examples), "truncated": 0, "dropped": 0, "tokens": 0, "trained_tokens": 0}
    for ex in examples:
        try:
            ids, labels = encode_example(tokenizer, ex, template)
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


def encode_labelled(tokenizer, examples: Sequence[LabelledExample], labels: Sequence[str], max_len: int
                    ) -> tuple[list[list[int]], list[int]]:
    """Token ids (text, after BOS for Llama-style tokenizers; cut to ``max_len``) and label indices."""
    from lmforge.finetune.chat_template import encode_text, uses_bos

    index = {lab: i for i, lab in enumerate(labels)}
    bos = [tokenizer.bos_id] if uses_bos(tokenizer) else []
    ids, ys = [], []
    for ex in examples:
        if ex.label not in index:
            raise DataError(f"{ex.where}: label '{ex.label}' is not one of {list(labels)}")
        x = bos + encode_text(tokenizer, ex.text)
        ids.append((x or [getattr(tokenizer, "eos_id", 0) or 0])[:max_len])
        ys.append(index[ex.label])
    return ids, ys
