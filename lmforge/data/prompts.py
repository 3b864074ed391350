"""Prompts with reference answers, for online RL (``finetune.mode: grpo``).

A record is ``{"prompt": TEXT, "answer": ...}`` (raw text, no chat template) or ``{"messages": [{role,
content}, ...], "answer": ...}`` (rendered with the chat template and its generation prompt, as SFT renders
a conversation; a trailing assistant message is dropped, so SFT chat files with an ``answer`` field work).
``answer`` may be missing or null when no reward needs it; other fields are ignored. ``data.columns``
renames fields (``{prompt: question}``). Files are json (an array) or jsonl; errors name the file and line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.data.records import DataError, as_text, read_records
from lmforge.data.sft import parse_messages
from lmforge.tokenizer.chat_template import encode_prompt, encode_text, uses_bos


@dataclass
class PromptExample:
    """One prompt: raw text or a conversation, and the answer the rewards check against."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    answer: Any = None
    where: str = ""

    def text(self) -> str:
        """The prompt as the reward functions see it (a conversation: its last user message)."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages or [] if m["role"] == "user"]
        return users[-1] if users else ""


def record_to_prompt(record: Any, where: str, columns: dict[str, str] | None = None) -> PromptExample:
    columns = dict(columns or {})
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    key = {k: columns.get(k, k) for k in ("prompt", "messages", "answer")}
    answer = record.get(key["answer"])
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: '{key['answer']}' must be a string or a number")
    if key["messages"] in record:
        raw = record[key["messages"]]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: '{key['messages']}' must be a non-empty list of {{role, content}} objects")
        messages = parse_messages(raw, where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a user message (the prompt to answer)")
        return PromptExample(messages=messages, answer=answer, where=where)
    if key["prompt"] in record:
        return PromptExample(prompt=as_text(record[key["prompt"]], where, "prompt"), answer=answer, where=where)
    keys = ", ".join(sorted(map(str, record))[:8])
    raise DataError(f"{where}: a prompt record needs 'prompt' or 'messages' (and 'answer'); it has {keys}. "
                    "Rename fields with data.columns")


def load_prompts(paths: str | os.PathLike | Sequence[str | os.PathLike], columns: dict[str, str] | None = None,
                 max_examples: int | None = None) -> list[PromptExample]:
    """Read prompt records from one or more json/jsonl files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[PromptExample] = []
    for path in paths:
        for line, record in read_records(path):
            out.append(record_to_prompt(record, f"{path}:{line}", columns))
            if max_examples is not None and len(out) >= max_examples:
                return out
    if not out:
        raise DataError(f"no prompts in {', '.join(map(str, paths))}; the file(s) are empty")
    return out


def encode_prompts(tokenizer, examples: Sequence[PromptExample], template: str | None, max_len: int
                   ) -> tuple[list[list[int]], int]:
    """Token ids of each prompt (a conversation through the chat template with its generation prompt; raw
    text after BOS when the template uses one), keeping the last ``max_len`` tokens of a longer one.
    Returns (ids, how many were cut)."""
    out, cut = [], 0
    for ex in examples:
        if ex.messages is not None:
            ids = encode_prompt(tokenizer, ex.messages, template)
        else:
            bos = [tokenizer.bos_id] if uses_bos(tokenizer, template) else []
            ids = bos + encode_text(tokenizer, ex.prompt or "")
        if not ids:
            raise DataError(f"{ex.where}: the prompt encodes to no tokens")
        if len(ids) > max_len:
            ids, cut = ids[-max_len:], cut + 1
        out.append(ids)
    return out, cut


__all__ = ["PromptExample", "encode_prompts", "load_prompts", "record_to_prompt"]
