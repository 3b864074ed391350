"""Decontamination: find training documents that share an n-gram with an evaluation set.

Text is lower-cased and cut into tokens: runs of letters/digits are words, and every CJK character
(Han, kana) is a token of its own, punctuation and spacing are dropped. A document is *contaminated* by an
evaluation set when any ``n`` consecutive tokens of it (default 13, GPT-3's choice, Brown et al., 2020
App. C) also occur inside one item of that set. For Chinese the same 13 means 13 consecutive characters
(ignoring punctuation) — about 7–9 words, long enough that a shared run is a quotation rather than a
common phrase, short enough to catch a quoted question or a poem couplet. Items shorter than ``n`` tokens
cannot be matched and are counted as ``items_too_short``; pass a smaller ``--decontaminate-ngram`` for
sets of short items.

Evaluation sets: ``.jsonl`` (one item per record, every string field of it — a list of strings is one field, its lines
joined; n-grams never cross fields),
``.json`` (a list of records, or one object = one item), anything else is text with one item per
non-empty line (``.txt``, ``.tsv``). A set is checked before any work (`check_paths`): a directory, a
symlink loop, a set with no item, JSON nested deeper than 64 levels or a record over 64 MB is an error.
Each set is indexed in memory (~100 bytes per distinct n-gram: a 10 MB eval set takes ~1 GB; evaluation
sets are small).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.config import UserError, loads_bounded
from lmforge.sources import ReadStats, _read_all, decode, refuse_symlink_loop

DEFAULT_NGRAM = 13
MODES = ("drop", "report")
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])")
_WORD = re.compile(r"[^\W_]+")


def tokens(text: str) -> list[str]:
    """Lower-cased words, each CJK character a token; punctuation dropped."""
    return _WORD.findall(_CJK.sub(r" \1 ", text.lower()))


def ngram_hashes(toks: list[str], n: int) -> Iterator[int]:
    """Hashes of every n-gram. Python's tuple hash: salted per process, so an index is only ever
    queried in the process that built it (each worker builds its own)."""
    for i in range(len(toks) - n + 1):
        yield hash(tuple(toks[i:i + n]))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        yield "\n".join(value)  # a field split into lines (a poem's lines, paragraphs) is one text
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_items(path: str) -> list[list[str]]:
    """An evaluation set's items, each a list of text fields."""
    data = decode(_read_all(path), ReadStats())
    low = path.lower().removesuffix(".gz")
    if low.endswith((".jsonl", ".ndjson")):
        items = []
        for lineno, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(list(_strings(loads_bounded(line, f"--decontaminate {path}:{lineno}"))))
            except json.JSONDecodeError as e:
                raise UserError(f"--decontaminate {path}:{lineno} is not valid JSON ({e.msg}); "
                                "fix the line or pass a .txt set (one item per line)") from None
        return items
    if low.endswith(".json"):
        try:
            obj = loads_bounded(data, f"--decontaminate {path}", max_chars=None)
        except json.JSONDecodeError as e:
            raise UserError(f"--decontaminate {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
        return [list(_strings(x)) for x in obj] if isinstance(obj, list) else [list(_strings(obj))]
    return [[line] for line in data.splitlines() if line.strip()]


class EvalSet:
    """One evaluation set's n-gram index: n-gram hash -> the (distinct) text holding it -> its items.

    Identical texts (a SQuAD paragraph shared by all its questions) are indexed once and remember every
    item they belong to; an n-gram found in several distinct texts keeps them all (``shared``), so
    ``items_of`` is exact.
    """

    def __init__(self, name: str, path: str, n: int):
        self.name, self.path, self.n = name, path, n
        self.index: dict[int, int] = {}  # n-gram -> first text id
        self.shared: dict[int, list[int]] = {}  # n-gram -> further text ids
        self.text_items: list[list[int]] = []
        self.items = 0
        self.too_short = 0
        text_ids: dict[str, int] = {}
        for item_no, fields in enumerate(read_items(path)):
            self.items += 1
            usable = False
            for text in fields:
                if text in text_ids:
                    usable = True
                    if self.text_items[text_ids[text]][-1] != item_no:
                        self.text_items[text_ids[text]].append(item_no)
                    continue
                toks = tokens(text)
                if len(toks) < n:
                    continue
                usable = True
                tid = text_ids[text] = len(self.text_items)
                self.text_items.append([item_no])
                for h in set(ngram_hashes(toks, n)):
                    first = self.index.setdefault(h, tid)
                    if first != tid:
                        self.shared.setdefault(h, []).append(tid)
            self.too_short += not usable

    def items_of(self, h: int) -> list[int]:
        """The items holding n-gram ``h`` (empty when none does)."""
        tid = self.index.get(h)
        if tid is None:
            return []
        out = list(self.text_items[tid])
        for t in self.shared.get(h, ()):
            out += self.text_items[t]
        return out


def set_names(paths: list[str]) -> list[str]:
    """Report names of the sets: the file name, or parent/file name where two sets share a file name."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{Path(p).name}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


class Decontaminator:
    """Matches documents against every evaluation set; ``match`` -> {set name: matched item numbers}."""

    def __init__(self, paths: list[str], n: int = DEFAULT_NGRAM):
        self.n = n
        self.sets = [EvalSet(name, p, n) for name, p in zip(set_names(paths), paths)]

    def match(self, text: str) -> dict[str, set[int]]:
        toks = tokens(text)
        hits: dict[str, set[int]] = {}
        if len(toks) < self.n:
            return hits
        for h in set(ngram_hashes(toks, self.n)):
            for s in self.sets:
                items = s.items_of(h)
                if items:
                    hits.setdefault(s.name, set()).update(items)
        return hits


def check_paths(paths: list[str]) -> list[str]:
    """The given eval-set paths, each checked to exist and to hold at least one item (read here, in the main
    process, so a bad set is one UserError before any work): a missing file, a directory, a symlink loop or
    an empty set is refused."""
    out = []
    for p in paths:
        if "://" not in p:
            local = Path(p).expanduser()
            if local.is_dir():
                raise UserError(f"--decontaminate {p} is a directory; pass the evaluation set files inside it "
                                f"(e.g. {p.rstrip('/')}/*.jsonl)")
            refuse_symlink_loop(p, "--decontaminate")
            if not local.is_file():
                raise UserError(f"--decontaminate {p}: no such file; pass evaluation sets as .jsonl/.json/.txt "
                                "files")
            p = str(local.resolve())
        if not read_items(p):
            raise UserError(f"--decontaminate {p} holds no items (an empty evaluation set would check nothing); "
                            "pass a set with one item per line or record")
        out.append(p)
    return out
