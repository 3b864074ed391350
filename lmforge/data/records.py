"""Record readers shared by fine-tuning and evaluation: JSON arrays and JSON Lines (record by record, each
with its line number), TSV/CSV tables, UTF-8 text — every error names the file and line.

These are the bottom of the data layer for example-shaped data (instruction pairs, labelled texts, QA
and summarization sets); token shards for pretraining live in `shards.py`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.config import UserError


class DataError(UserError):
    """Malformed example data (fine-tuning or evaluation); the message names the file and line."""


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


def as_text(value: Any, where: str, what: str) -> str:
    """``value`` when it is a string, else a `DataError` naming the record and field."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value
