"""Heuristic quality filters for web text: Gopher quality + repetition, C4 line rules, FineWeb rules.

Each filter returns the rule that removed a document (``"gopher_quality.min_doc_words"``) or ``None``;
C4 also rewrites the document (it keeps only the lines that pass) and counts the lines it dropped.
Defaults are the published thresholds; every one can be changed (``--quality-config``), and ``null``
turns a rule off.

- **Gopher quality** (Rae et al., 2021, "Scaling Language Models", App. A.1.1): between 50 and 100,000
  words; mean word length 3–10 characters; ``#`` and ellipsis each at most 0.1 per word; at most 90 % of
  lines starting with a bullet, at most 30 % ending with an ellipsis; at least 80 % of words holding an
  alphabetic character; at least 2 of the stop words *the, be, to, of, and, that, have, with*.
- **Gopher repetition** (same paper, Table A1): duplicate lines ≤ 30 % (of lines) and ≤ 20 % (of
  characters); the same for paragraphs; the most frequent 2/3/4-gram covers ≤ 20/18/16 % of the
  characters; characters inside repeated 5…10-grams (each occurrence after the first) ≤ 15, 14, 13, 12,
  11, 10 %.
- **C4** (Raffel et al., 2020, §2.2): keep only lines ending in terminal punctuation (``. ! ? "``, not an
  ellipsis) with at least 5 words, drop lines mentioning "javascript" or a cookie / terms-of-use notice
  (the reference code's list), drop Wikipedia citation markers; drop the page when it contains "lorem
  ipsum" or a curly bracket, or keeps fewer than 3 sentences. (The bad-words list is not applied: it would
  be a download.)
- **FineWeb** (Penedo et al., 2024, §3.3): remove when ≤ 12 % of lines end in punctuation, when ≥ 67 % of
  lines are ≤ 30 characters, when ≥ 1 % of the characters sit in duplicated lines (0.01, datatrove's
  ``FineWebQualityFilter`` default), or when there are more than 0.3 newlines per word (same source).

**Chinese (and Japanese): a character-based variant** (``*_zh`` keys), because there are no spaces to
count words by. Words become characters (letters/digits, CJK ideographs included, punctuation excluded);
the word thresholds are rescaled by ~1.5–2 characters per Chinese word; line endings include
``。！？”」』``; repetition n-grams are character n-grams of twice the word n (top 4/6/8-grams, duplicated
10…20-grams) with the same fractions; stop words are common function characters (的 了 是 在 和 有 不 之 也
而 其 以). These rescalings are this project's choice, documented in ``DEFAULTS`` and overridable.

Blank lines are not lines here (the published code counts them; trafilatura's output has none anyway).
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from typing import Any

import numpy as np

from lmforge.config import UserError

FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")  # applied in this order (FineWeb's)
ALIASES = {"gopher": ("gopher_repetition", "gopher_quality"), "all": FILTERS}
CHAR_LANGS = frozenset({"zh", "ja"})  # languages written without spaces: the character-based variant

DEFAULTS: dict[str, dict[str, Any]] = {
    "gopher_quality": {
        "min_doc_words": 50, "max_doc_words": 100_000, "min_avg_word_length": 3, "max_avg_word_length": 10,
        "max_hash_word_ratio": 0.1, "max_ellipsis_word_ratio": 0.1, "max_bullet_lines_ratio": 0.9,
        "max_ellipsis_lines_ratio": 0.3, "min_alpha_words_ratio": 0.8, "min_stop_words": 2,
        "stop_words": ["the", "be", "to", "of", "and", "that", "have", "with"],
    },
    "gopher_quality_zh": {
        "min_doc_chars": 80, "max_doc_chars": 200_000,  # 50 / 100k words x ~1.6-2 chars per word
        "max_hash_char_ratio": 0.05, "max_ellipsis_char_ratio": 0.05,  # 0.1 per word / ~2 chars
        "max_bullet_lines_ratio": 0.9, "max_ellipsis_lines_ratio": 0.3,
        "min_text_chars_ratio": 0.6,  # letters/digits among non-space chars (Gopher's 80 % alpha words)
        "min_stop_words": 2,
        "stop_words": ["的", "了", "是", "在", "和", "有", "不", "之", "也", "而", "其", "以"],
    },
    "gopher_repetition": {
        "dup_line_frac": 0.30, "dup_para_frac": 0.30, "dup_line_char_frac": 0.20, "dup_para_char_frac": 0.20,
        "top_ngram_char_frac": {"2": 0.20, "3": 0.18, "4": 0.16},
        "dup_ngram_char_frac": {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10},
    },
    "gopher_repetition_zh": {
        "dup_line_frac": 0.30, "dup_para_frac": 0.30, "dup_line_char_frac": 0.20, "dup_para_char_frac": 0.20,
        "top_ngram_char_frac": {"4": 0.20, "6": 0.18, "8": 0.16},
        "dup_ngram_char_frac": {"10": 0.15, "12": 0.14, "14": 0.13, "16": 0.12, "18": 0.11, "20": 0.10},
    },
    "c4": {
        "terminal_punct": True, "min_words_per_line": 5, "min_sentences": 3, "max_word_length": 1000,
        "lorem_ipsum": True, "javascript": True, "curly_bracket": True, "policy": True, "citations": True,
    },
    "c4_zh": {
        "terminal_punct": True, "min_chars_per_line": 8, "min_sentences": 3, "max_word_length": 1000,
        "lorem_ipsum": True, "javascript": True, "curly_bracket": True, "policy": True, "citations": True,
    },
    "fineweb": {"line_punct_thr": 0.12, "short_line_thr": 0.67, "short_line_length": 30,
                "char_duplicates_ratio": 0.01, "new_line_ratio": 0.3},
    "fineweb_zh": {"line_punct_thr": 0.12, "short_line_thr": 0.67, "short_line_length": 10,
                   # newlines per character: 0.3 per word / ~1.5 characters per word. With the 10-character
                   # short-line rule on, lines long enough to pass it keep this ratio below 0.1, so it only
                   # matters when short_line_thr is relaxed.
                   "char_duplicates_ratio": 0.01, "new_line_ratio": 0.2},
}

_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…–—·"
_BULLETS = ("•", "●", "◦", "‣", "▪", "■", "-", "*", "·", "–")
_ELLIPSES = ("...", "…")
_END_EN = (".", "!", "?", '"', "'", "”", "’")
_END_ZH = _END_EN + ("。", "！", "？", "」", "』", "）")
_FINEWEB_STOP_EN = (".", "'", '"', "!", "?")
_FINEWEB_STOP_ZH = _FINEWEB_STOP_EN + ("。", "！", "？", "”", "」", "』")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_POLICY_ZH = _POLICY + ("隐私政策", "使用条款", "服务条款", "隐私权政策", "使用cookie", "cookie政策",  # Simplified
                        "隱私政策", "使用條款", "服務條款", "隱私權政策", "cookie政策")  # Traditional
_SENTENCE_EN = re.compile(r"[.!?]+(?=[\"'”’)\]]*(?:\s|$))")
_SENTENCE_ZH = re.compile(r"[。！？!?]+|[.](?=\s|$)")


def expand_names(spec: str | list[str] | None) -> list[str]:
    """``"gopher,c4"`` -> the filters to run, in FineWeb's order; unknown names are a UserError."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in FILTERS:
            chosen.add(name)
        else:
            raise UserError(f"--quality {name!r} is not a filter; use any of "
                            f"{', '.join(FILTERS + tuple(ALIASES))}, comma-separated")
    return [f for f in FILTERS if f in chosen]


def _is_number(v: Any) -> bool:
    """A finite int or float (JSON's true/false and NaN/Infinity are not thresholds)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_n(k: Any) -> bool:
    """An n-gram size key: an integer >= 1, written as digits ("5") or a number (5)."""
    return (str(k).isascii() and str(k).isdigit() and int(k) >= 1) if not isinstance(k, bool) else False


def resolve_thresholds(overrides: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """DEFAULTS with ``overrides`` (``{"gopher_quality": {"min_doc_words": 30}, "c4_zh": {...}}``) applied."""
    out = copy.deepcopy(DEFAULTS)
    for group, values in (overrides or {}).items():
        if group not in out:
            raise UserError(f"--quality-config: {group!r} is not a filter; use one of {', '.join(DEFAULTS)}")
        if not isinstance(values, dict):
            raise UserError(f"--quality-config: {group} must map threshold names to values, "
                            f"e.g. {{\"{group}\": {{\"{next(iter(DEFAULTS[group]))}\": ...}}}}")
        for key, value in values.items():
            if key not in out[group]:
                raise UserError(f"--quality-config: {group}.{key} is not a threshold; "
                                f"known: {', '.join(DEFAULTS[group])}")
            default = DEFAULTS[group][key]
            if value is not None and isinstance(default, dict):
                if not isinstance(value, dict) or not all(_is_n(k) for k in value):
                    raise UserError(f"--quality-config: {group}.{key} maps n (an integer >= 1) to a fraction, "
                                    f"e.g. {default}")
                for n, frac in value.items():
                    if frac is not None and not _is_number(frac):
                        raise UserError(f"--quality-config: {group}.{key}.{n}={frac!r} must be a number "
                                        "(a fraction, or null = off)")
                value = {str(k): v for k, v in value.items()}
            elif value is not None and isinstance(default, list):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise UserError(f"--quality-config: {group}.{key} must be a list of strings")
            elif value is not None and isinstance(default, bool):
                if not isinstance(value, bool):
                    raise UserError(f"--quality-config: {group}.{key} must be true or false")
            elif value is not None and not _is_number(value):
                raise UserError(f"--quality-config: {group}.{key}={value!r} must be a number (or null = off)")
            out[group][key] = value
    return out


# ----------------------------------------------------------------------------------------- helpers

def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _words(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation stripped; pure punctuation is not a word."""
    return [w for w in (t.strip(_PUNCT) for t in text.split()) if w]


def _chars(text: str) -> list[str]:
    """The character "words" of the zh variant: letters and digits (CJK ideographs are letters)."""
    return [c for c in text if c.isalnum()]


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(duplicate items, characters in them): every occurrence after the first counts."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class _NGrams:
    """Dense ids of a token sequence's n-grams (equal n-grams share an id), built exactly and vectorized:
    the n-gram at i is the pair (its (n-1)-gram id at i, token i+n-1), renumbered with ``np.unique``."""

    def __init__(self, tokens: list[str]):
        vocab: dict[str, int] = {}
        self.tok = np.fromiter((vocab.setdefault(t, len(vocab)) for t in tokens), dtype=np.uint64,
                               count=len(tokens))
        self.v = np.uint64(max(len(vocab), 1))
        self.cache: dict[int, np.ndarray] = {1: self.tok.astype(np.int64)}

    def ids(self, n: int) -> np.ndarray:
        if n not in self.cache:
            prev = self.ids(n - 1)[:-1].astype(np.uint64)  # (n-1)-grams that have a next token
            pair = prev * self.v + self.tok[n - 1:]  # < len x vocab <= 2^64 for any real document
            self.cache[n] = np.unique(pair, return_inverse=True)[1].reshape(-1).astype(np.int64)
        return self.cache[n]


def _top_ngram_frac(grams: _NGrams, lens: np.ndarray, total: int, n: int, sep: int) -> float:
    """Characters covered by the most frequent n-gram (its length x its count) / ``total``."""
    if len(lens) < n or total == 0:
        return 0.0
    ids = grams.ids(n)
    counts = np.bincount(ids)
    top = int(counts.argmax())
    if counts[top] < 2:
        return 0.0
    start = int(np.flatnonzero(ids == top)[0])
    length = int(lens[start:start + n].sum()) + sep * (n - 1)
    return length * int(counts[top]) / total


def _dup_ngram_frac(grams: _NGrams, lens: np.ndarray, total: int, n: int) -> float:
    """Characters of the tokens inside repeated occurrences of an n-gram (every occurrence after its
    first, as datatrove's GopherRepetitionFilter counts them) / ``total``; a token is counted once even
    when several repeated n-grams overlap it."""
    if len(lens) < n or total == 0:
        return 0.0
    ids = grams.ids(n)
    _, first = np.unique(ids, return_index=True)  # first occurrence of each (dense) id
    repeat_starts = np.flatnonzero(first[ids] != np.arange(len(ids)))
    if not len(repeat_starts):
        return 0.0
    cover = np.zeros(len(lens) + 1, dtype=np.int64)
    np.add.at(cover, repeat_starts, 1)
    np.add.at(cover, repeat_starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(lens[covered].sum()) / total


def _over(value: float, limit: Any) -> bool:
    return limit is not None and value > limit


def _under(value: float, limit: Any) -> bool:
    return limit is not None and value < limit


# ----------------------------------------------------------------------------------------- filters

def gopher_quality(text: str, t: dict[str, Any]) -> str | None:
    words = _words(text)
    n = len(words)
    if _under(n, t["min_doc_words"]) or n == 0:
        return "min_doc_words"
    if _over(n, t["max_doc_words"]):
        return "max_doc_words"
    mean = sum(map(len, words)) / n
    if _under(mean, t["min_avg_word_length"]):
        return "min_avg_word_length"
    if _over(mean, t["max_avg_word_length"]):
        return "max_avg_word_length"
    if _over(text.count("#") / n, t["max_hash_word_ratio"]):
        return "max_hash_word_ratio"
    if _over(sum(text.count(e) for e in _ELLIPSES) / n, t["max_ellipsis_word_ratio"]):
        return "max_ellipsis_word_ratio"
    if _under(sum(any(c.isalpha() for c in w) for w in words) / n, t["min_alpha_words_ratio"]):
        return "min_alpha_words_ratio"
    return _line_and_stop_rules(text, t, [w.lower() for w in words])


def gopher_quality_zh(text: str, t: dict[str, Any]) -> str | None:
    chars = _chars(text)
    n = len(chars)
    if _under(n, t["min_doc_chars"]) or n == 0:
        return "min_doc_chars"
    if _over(n, t["max_doc_chars"]):
        return "max_doc_chars"
    if _over(text.count("#") / n, t["max_hash_char_ratio"]):
        return "max_hash_char_ratio"
    if _over((text.count("...") + text.count("…")) / n, t["max_ellipsis_char_ratio"]):
        return "max_ellipsis_char_ratio"
    nonspace = sum(not c.isspace() for c in text)
    if _under(n / max(nonspace, 1), t["min_text_chars_ratio"]):
        return "min_text_chars_ratio"
    return _line_and_stop_rules(text, t, chars)


def _line_and_stop_rules(text: str, t: dict[str, Any], words: list[str]) -> str | None:
    lines = _lines(text) or [""]
    if _over(sum(ln.startswith(_BULLETS) for ln in lines) / len(lines), t["max_bullet_lines_ratio"]):
        return "max_bullet_lines_ratio"
    if _over(sum(ln.endswith(_ELLIPSES) for ln in lines) / len(lines), t["max_ellipsis_lines_ratio"]):
        return "max_ellipsis_lines_ratio"
    if t["min_stop_words"] is not None:
        stops = set(t["stop_words"])
        if sum(w in stops for w in words) < t["min_stop_words"]:
            return "min_stop_words"
    return None


def gopher_repetition(text: str, t: dict[str, Any], char_level: bool = False) -> str | None:
    total = len(text)
    if total == 0:
        return None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    n_dup, c_dup = _dup_stats(paragraphs)
    if _over(n_dup / max(len(paragraphs), 1), t["dup_para_frac"]):
        return "dup_para_frac"
    if _over(c_dup / total, t["dup_para_char_frac"]):
        return "dup_para_char_frac"
    lines = _lines(text)
    n_dup, c_dup = _dup_stats(lines)
    if _over(n_dup / max(len(lines), 1), t["dup_line_frac"]):
        return "dup_line_frac"
    if _over(c_dup / total, t["dup_line_char_frac"]):
        return "dup_line_char_frac"
    tokens = _chars(text) if char_level else [w.lower() for w in _words(text)]
    lens = np.fromiter((len(w) for w in tokens), dtype=np.int64, count=len(tokens))
    grams = _NGrams(tokens)
    sep = 0 if char_level else 1
    for n, frac in sorted(((int(k), v) for k, v in (t["top_ngram_char_frac"] or {}).items())):
        if _over(_top_ngram_frac(grams, lens, total, n, sep), frac):
            return f"top_{n}gram_char_frac"
    words_total = int(lens.sum())
    for n, frac in sorted(((int(k), v) for k, v in (t["dup_ngram_char_frac"] or {}).items())):
        if _over(_dup_ngram_frac(grams, lens, words_total, n), frac):
            return f"dup_{n}gram_char_frac"
    return None


def c4(text: str, t: dict[str, Any], lines_removed: Counter, char_level: bool = False) -> tuple[str | None, str]:
    """C4's line rules: (reason the page is dropped or None, the kept lines)."""
    ends = _END_ZH if char_level else _END_EN
    policy = _POLICY_ZH if char_level else _POLICY
    sentence_re = _SENTENCE_ZH if char_level else _SENTENCE_EN
    kept: list[str] = []
    sentences = 0
    for line in _lines(text):
        if t["max_word_length"] is not None and any(len(w) > t["max_word_length"] for w in line.split()):
            lines_removed["long_word"] += 1
            continue
        if t["citations"]:
            line = _CITATION.sub("", line).strip()
        if t["terminal_punct"] and (not line.endswith(ends) or line.endswith(_ELLIPSES + ("……",))):
            lines_removed["no_terminal_punct"] += 1
            continue
        if char_level:
            if _under(len(_chars(line)), t["min_chars_per_line"]):
                lines_removed["too_few_chars"] += 1
                continue
        elif _under(len(line.split()), t["min_words_per_line"]):
            lines_removed["too_few_words"] += 1
            continue
        low = line.lower()
        if t["lorem_ipsum"] and "lorem ipsum" in low:
            return "lorem_ipsum", text
        if t["javascript"] and "javascript" in low:
            lines_removed["javascript"] += 1
            continue
        if t["curly_bracket"] and "{" in line:
            return "curly_bracket", text
        if t["policy"] and any(p in low for p in policy):
            lines_removed["policy"] += 1
            continue
        sentences += max(len(sentence_re.findall(line)), 1)
        kept.append(line)
    if _under(sentences, t["min_sentences"]) or not kept:
        return "min_sentences", text
    return None, "\n".join(kept)


def fineweb(text: str, t: dict[str, Any], char_level: bool = False) -> str | None:
    lines = _lines(text)
    if not lines:
        return "line_punct_thr"
    stops = _FINEWEB_STOP_ZH if char_level else _FINEWEB_STOP_EN
    ratio = sum(ln.endswith(stops) for ln in lines) / len(lines)
    if t["line_punct_thr"] is not None and ratio <= t["line_punct_thr"]:
        return "line_punct_thr"
    if t["short_line_thr"] is not None and t["short_line_length"] is not None:
        ratio = sum(len(ln) <= t["short_line_length"] for ln in lines) / len(lines)
        if ratio >= t["short_line_thr"]:
            return "short_line_thr"
    if t["char_duplicates_ratio"] is not None:
        ratio = _dup_stats(lines)[1] / max(sum(map(len, lines)), 1)
        if ratio >= t["char_duplicates_ratio"]:
            return "char_duplicates_ratio"
    units = len(_chars(text)) if char_level else len(_words(text))
    if _over(text.count("\n") / max(units, 1), t["new_line_ratio"]):
        return "new_line_ratio"
    return None


class QualityFilters:
    """The chosen filters with resolved thresholds; ``check`` runs them on one document."""

    def __init__(self, names: list[str], thresholds: dict[str, dict[str, Any]] | None = None):
        self.names = names
        self.t = thresholds or resolve_thresholds(None)

    def check(self, text: str, lang: str, lines_removed: Counter) -> tuple[str | None, str]:
        """(``"filter.rule"`` that drops the document or None, the text to keep).

        ``lang`` picks the character-based variant for CHAR_LANGS. C4 line removals are added to
        ``lines_removed`` as ``"c4.<rule>"`` (``"c4_zh.<rule>"``).
        """
        zh = lang in CHAR_LANGS
        for name in self.names:
            group = f"{name}_zh" if zh else name
            t = self.t[group]
            if name == "gopher_quality":
                reason = (gopher_quality_zh if zh else gopher_quality)(text, t)
            elif name == "gopher_repetition":
                reason = gopher_repetition(text, t, char_level=zh)
            elif name == "c4":
                removed: Counter = Counter()
                reason, text = c4(text, t, removed, char_level=zh)
                for k, v in removed.items():
                    lines_removed[f"{group}.{k}"] += v
            else:
                reason = fineweb(text, t, char_level=zh)
            if reason is not None:
                return f"{group}.{reason}", text
        return None, text
