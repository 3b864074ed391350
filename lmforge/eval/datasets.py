"""Evaluation data readers: text for perplexity, QA (SQuAD JSON, NQ-Open / generic jsonl), summarization
(SciTLDR / generic jsonl) and translation (Tatoeba-style TSV / jsonl). Errors name the file and line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import loads_bounded
from lmforge.data.records import (
    DataError,
    check_file,
    read_records,
    read_table,
    read_text,
    row_cells,
    table_columns,
)
from lmforge.eval.text import cjk_fraction
from lmforge.sources import iter_file_documents


@dataclass
class GenExample:
    """One generation example: the fields its prompt is built from, and the reference answers."""

    fields: dict[str, str]
    references: list[str]
    id: str = ""
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _first(rec: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in rec and rec[n] is not None), None)


def _strings(value: Any, where: str, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict) and "text" in value:  # SQuAD-like {"text": [...]} answer objects
        value = value["text"]
        value = [value] if isinstance(value, str) else value
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a string or a list of strings")
    out = []
    for v in value:
        if isinstance(v, dict) and "text" in v:
            v = v["text"]
        if not isinstance(v, str):
            raise DataError(f"{where}: {what} must be a string or a list of strings")
        out.append(v)
    if not out:
        raise DataError(f"{where}: {what} is empty")
    return out


def _joined(value: Any, where: str, what: str) -> str:
    """A string, or a list of sentences (SciTLDR ``source``) joined with spaces."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string or a list of strings")
    return value


def _records(path: str | os.PathLike):
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec


# ---- perplexity text -------------------------------------------------------------------------------
def read_texts(path: str | os.PathLike, text_field: str = "text", txt_mode: str = "file") -> list[str]:
    """Documents to score. .jsonl/.json hold strings or objects with ``text_field``; any other file is
    text (also .gz/.zst), one document per file, per blank-line block or per line (``txt_mode``, as in
    `lmforge prepare`, so a model is scored on documents cut the way it was trained on them)."""
    p = check_file(path)
    if p.suffix.lower() not in (".json", ".jsonl"):
        docs = [d for d in iter_file_documents(str(p), txt_mode=txt_mode) if d.strip()]
        if not docs:
            raise DataError(f"'{p}' is empty; perplexity needs text")
        return docs
    out = []
    for line, rec in read_records(p):
        where = f"{p}:{line}"
        if isinstance(rec, str):
            out.append(rec)
            continue
        if not isinstance(rec, dict) or text_field not in rec:
            keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: record has no '{text_field}' field ({keys}); pass --text-field")
        out.append(_joined(rec[text_field], where, text_field))
    out = [t for t in out if t.strip()]
    if not out:
        raise DataError(f"'{p}' holds no text")
    return out


# ---- QA ---------------------------------------------------------------------------------------------
QUESTION_FIELDS = ("question", "query", "q")
ANSWER_FIELDS = ("answers", "answer", "gold", "references", "target")
CONTEXT_FIELDS = ("context", "passage", "document")


def load_qa(path: str | os.PathLike) -> list[GenExample]:
    """SQuAD JSON (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``) or jsonl with a question,
    answer(s) and an optional context (NQ-Open: ``{"question", "answer": [...]}``)."""
    p = check_file(path)
    if p.suffix.lower() == ".json":
        try:
            data = loads_bounded(read_text(p), str(p), DataError, max_chars=None)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and "data" in data:
            return _squad(p, data)
    out = []
    for where, rec in _records(p):
        q, a = _first(rec, QUESTION_FIELDS), _first(rec, ANSWER_FIELDS)
        if q is None or a is None:
            raise DataError(f"{where}: a QA record needs a question and answer(s) "
                            f"(fields {'/'.join(QUESTION_FIELDS)} and {'/'.join(ANSWER_FIELDS)}); "
                            f"it has {', '.join(sorted(rec))}")
        c = _first(rec, CONTEXT_FIELDS)
        fields = {"question": _joined(rec[q], where, q)}
        if c is not None:
            fields["context"] = _joined(rec[c], where, c)
        out.append(GenExample(fields, _strings(rec[a], where, a), str(rec.get("id", len(out))), where))
    if not out:
        raise DataError(f"'{p}' holds no QA examples")
    return out


def _squad(p: Path, data: dict) -> list[GenExample]:
    out = []
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                where = f"{p}: question {qa.get('id', len(out))}"
                answers = [a["text"] for a in qa.get("answers", []) if isinstance(a, dict) and "text" in a]
                if not answers:  # SQuAD 2.0 unanswerable questions have no gold span
                    continue
                out.append(GenExample({"context": para["context"], "question": qa["question"]}, answers,
                                      str(qa.get("id", len(out))), where))
    if not out:
        raise DataError(f"'{p}' holds no answerable SQuAD questions")
    return out


# ---- summarization ----------------------------------------------------------------------------------
SOURCE_FIELDS = ("source", "document", "article", "text", "abstract", "dialogue", "content")
SUMMARY_FIELDS = ("target", "summary", "summaries", "highlights", "tldr", "references", "reference")


SUMMARY_FORMATS = (".jsonl", ".json", ".tsv", ".csv")


def load_summarization(path: str | os.PathLike, source_field: str | None = None,
                       target_field: str | None = None) -> list[GenExample]:
    """Source texts and reference summaries from

    * jsonl / json: a source (string or list of sentences) and one or more references per record
      (SciTLDR: ``{"source": [sentences], "target": [tldrs]}``);
    * TSV / CSV: a header row naming the columns (source: document/article/text/…, summary:
      summary/target/…), or column numbers for a file without a header (``source_field="0"``).

    ``source_field`` / ``target_field`` name the field or column when the defaults do not find it.
    """
    p = check_file(path)
    suffix = p.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return _summaries_from_table(p, source_field, target_field)
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{p}: summarization data must be one of {', '.join(SUMMARY_FORMATS)} (jsonl: "
                        "source and target fields; TSV/CSV: a header row, or --source-field/--target-field "
                        "column numbers); rename the file or convert it")
    out = []
    for where, rec in _records(p):
        s = source_field if source_field is not None else _first(rec, SOURCE_FIELDS)
        t = target_field if target_field is not None else _first(rec, SUMMARY_FIELDS)
        if s not in rec or t not in rec:
            need_s, need_t = source_field or "/".join(SOURCE_FIELDS), target_field or "/".join(SUMMARY_FIELDS)
            raise DataError(f"{where}: a summarization record needs a source ({need_s}) and reference "
                            f"summaries ({need_t}); it has {', '.join(sorted(rec))}; set --source-field / "
                            "--target-field")
        refs = _strings(rec[t], where, t)
        out.append(GenExample({"source": _joined(rec[s], where, s)}, refs,
                              str(rec.get("paper_id", rec.get("id", len(out)))), where))
    if not out:
        raise DataError(f"'{path}' holds no summarization examples")
    return out


def _summaries_from_table(p: Path, source_field: str | None, target_field: str | None) -> list[GenExample]:
    """One example per row: a TSV/CSV with a header, or header-less with column numbers."""
    rows, (si, ti) = table_columns(p, [(source_field, SOURCE_FIELDS), (target_field, SUMMARY_FIELDS)],
                                   "set --source-field / --target-field (names, or column numbers without a "
                                   "header)")
    out = []
    for line, row in rows:
        source, target = row_cells(row, f"{p}:{line}", [si, ti])
        out.append(GenExample({"source": source.strip()}, [target.strip()], str(len(out)), f"{p}:{line}"))
    if not out:
        raise DataError(f"'{p}' holds no summarization examples")
    return out


# ---- translation ------------------------------------------------------------------------------------
LANG_NAMES = {"en": "English", "zh": "Chinese", "de": "German", "fr": "French", "es": "Spanish",
              "ja": "Japanese", "ko": "Korean", "ru": "Russian", "it": "Italian", "pt": "Portuguese"}


def load_translation(path: str | os.PathLike, src_lang: str | None = None, tgt_lang: str | None = None,
                     reverse: bool = False) -> tuple[list[GenExample], str, str]:
    """Sentence pairs -> examples with every reference of a repeated source sentence grouped together.

    TSV/TXT: ``source<TAB>target[<TAB>anything]`` without a header (Tatoeba ``cmn.txt``; ``reverse`` swaps
    the columns). jsonl: ``{"source"|"src", "target"|"tgt"|"references"}``, or language-code keys
    (``{"en": …, "zh": …}``) with ``src_lang`` / ``tgt_lang``. Returns (examples, src_lang, tgt_lang);
    languages not given are guessed (``zh`` for mostly-CJK text, else ``en``).
    """
    p = check_file(path)
    pairs: list[tuple[str, list[str], str]] = []
    if p.suffix.lower() in (".json", ".jsonl"):
        for where, rec in _records(p):
            if src_lang and tgt_lang and src_lang in rec and tgt_lang in rec:
                s, t = src_lang, tgt_lang
            else:
                s = _first(rec, ("source", "src"))
                t = _first(rec, ("target", "tgt", "references", "reference"))
            if s is None or t is None:
                raise DataError(f"{where}: a translation record needs source/src and target/tgt fields (or "
                                f"--src-lang/--tgt-lang keys); it has {', '.join(sorted(rec))}")
            src, refs = _joined(rec[s], where, s), _strings(rec[t], where, t)
            pairs.append((src, refs, where))
    else:
        for line, row in read_table(p, "\t"):
            where = f"{p}:{line}"
            if len(row) < 2:
                raise DataError(f"{where}: expected source<TAB>target, found {len(row)} column(s)")
            src, tgt = (row[1], row[0]) if reverse else (row[0], row[1])
            pairs.append((src.strip(), [tgt.strip()], where))
    if not pairs:
        raise DataError(f"'{p}' holds no sentence pairs")
    grouped: dict[str, GenExample] = {}
    for src, refs, where in pairs:
        ex = grouped.get(src)
        if ex is None:
            grouped[src] = GenExample({"source": src}, list(refs), str(len(grouped)), where)
        else:
            ex.references += [r for r in refs if r not in ex.references]
    examples = list(grouped.values())
    sample = examples[:2000]
    src_lang = src_lang or ("zh" if cjk_fraction(e.fields["source"] for e in sample) > 0.3 else "en")
    tgt_lang = tgt_lang or ("zh" if cjk_fraction(r for e in sample for r in e.references) > 0.3 else "en")
    return examples, src_lang, tgt_lang


def lang_name(code: str) -> str:
    return LANG_NAMES.get(code.lower(), code)


def subset(examples: list, n: int | None, how: str = "first") -> list:
    """The first ``n`` examples, or ``n`` spread evenly over the file (``how="spread"``)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise DataError(f"--max-examples={n} must be positive")
    if how == "spread":
        return [examples[(i * len(examples)) // n] for i in range(n)]
    return list(examples[:n])
