"""Labelled text examples (text + label) for classification — fine-tuning a head and evaluating one —
from TSV / CSV (with a header, or column numbers) and JSON / JSON Lines, and their encoding to token ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lmforge.data.records import (
    DataError,
    as_text,
    check_file,
    is_index,
    read_records,
    row_cells,
    table_columns,
)
from lmforge.tokenizer.chat_template import encode_text, uses_bos


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
            out.append(LabelledExample(as_text(rec[tf], where, str(tf)), str(rec[label_field]), where))
            if max_examples is not None and len(out) >= max_examples:
                break
    else:
        if is_index(label_field) and text_field is None:
            text_field = 0  # header-less: text in the first column
        rows, (ti, li) = table_columns(p, [(text_field, TEXT_FIELDS), (label_field, ())],
                                       "set data.text_field / data.label_field, or column numbers for a file "
                                       "without a header", delimiter)
        for line, row in rows:
            text, label = row_cells(row, f"{p}:{line}", [ti, li])
            out.append(LabelledExample(text, label.strip(), f"{p}:{line}"))
            if max_examples is not None and len(out) >= max_examples:
                break
    if not out:
        raise DataError(f"no labelled examples in '{p}'")
    return out


def label_list(examples: Iterable[LabelledExample]) -> list[str]:
    """Sorted distinct labels (numerically when all are integers: "2" before "10")."""
    labels = {e.label for e in examples}
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)



def encode_labelled(tokenizer, examples: Sequence[LabelledExample], labels: Sequence[str], max_len: int
                    ) -> tuple[list[list[int]], list[int]]:
    """Token ids (text, after BOS for Llama-style tokenizers; cut to ``max_len``) and label indices."""
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
