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

from lmforge.config import UserError, loads_bounded


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
            yield i, loads_bounded(line, f"{p}:{i}", DataError)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{i}: invalid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                            "file must be one JSON object") from None


def _read_json_array(p: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Walk a top-level JSON array element by element so each record keeps its line number."""
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
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = loads_bounded(text, f"{p}:{line}", DataError, pos=pos)
        except json.JSONDecodeError as e:
            fail(e.pos, f"invalid JSON ({e.msg})")
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


def table_columns(path: str | os.PathLike, columns: list[tuple[str | int | None, tuple[str, ...]]], hint: str,
                  delimiter: str | None = None) -> tuple[Iterator[tuple[int, list[str]]], list[int]]:
    """Open a TSV/CSV and find its columns: ``columns`` is ``[(given, default_names), ...]``.

    When every ``given`` is a column number (``0``, ``"1"``) the file has no header; otherwise the first
    row is the header and each column is ``given`` by name, or the first of ``default_names`` present.
    Returns (the rows after any header, the column indices); ``hint`` ends the error naming the fix.
    """
    rows = read_table(path, delimiter)
    if all(is_index(given) for given, _ in columns):
        return rows, [int(given) for given, _ in columns]
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    header = [h.strip() for h in header]
    names = [str(given) if given is not None else next((f for f in defaults if f in header), None)
             for given, defaults in columns]
    for name, (_, defaults) in zip(names, columns):
        if name is None or name not in header:
            raise DataError(f"{path}:1: header has no column '{name or '/'.join(defaults)}' (columns: "
                            f"{', '.join(header)}); {hint}")
    return rows, [header.index(name) for name in names]


def row_cells(row: list[str], where: str, indices: list[int]) -> list[str]:
    """The cells of ``row`` at ``indices``, or a `DataError` when the row is too short."""
    if len(row) <= max(indices):
        raise DataError(f"{where}: row has {len(row)} column(s), expected at least {max(indices) + 1}")
    return [row[i] for i in indices]


def is_index(v: Any) -> bool:
    """A column number: an int, or a string of digits."""
    return isinstance(v, int) or (isinstance(v, str) and v.isdigit())


def as_text(value: Any, where: str, what: str) -> str:
    """``value`` when it is a string, else a `DataError` naming the record and field."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value
