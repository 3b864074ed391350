"""Extractive / open QA metrics: exact match and token F1 with SQuAD v1.1 normalization.

English follows the official SQuAD evaluation script exactly (lower case, strip ASCII punctuation and the
articles a/an/the, collapse whitespace, whitespace tokens). Text with Chinese characters is additionally
scored per character (CMRC 2018 convention) with Chinese/full-width punctuation removed, so a Chinese
answer gets partial credit for overlapping characters.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from lmforge.eval.text import mixed_tokens

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# ASCII punctuation (SQuAD) plus the CJK and full-width punctuation CMRC 2018 strips.
_PUNCT = set(string.punctuation) | set(
    "－：＿＊＾／＼～｀＋＝，。：？！“”；‘’《》〈〉［］｛｝（）【】「」『』…、·〔〕—～￥％＃＠＆"
)


def normalize_answer(s: str) -> str:
    """SQuAD normalization (+ CJK punctuation): lower, drop punctuation, drop articles, fix whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def answer_tokens(s: str) -> list[str]:
    """Normalized tokens: whitespace words, with each CJK character a token of its own."""
    return mixed_tokens(normalize_answer(s))


def exact_match(prediction: str, gold: str) -> float:
    return float(answer_tokens(prediction) == answer_tokens(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = answer_tokens(prediction), answer_tokens(gold)
    if not pred or not ref:  # SQuAD v2 convention: both empty = 1, one empty = 0
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score against any of the gold answers (SQuAD's metric_max_over_ground_truths)."""
    if isinstance(golds, str):
        golds = [golds]
    if not golds:
        raise ValueError("an example needs at least one gold answer")
    return max(metric(prediction, g) for g in golds)


def qa_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus EM and F1 in percent (means over examples), like the SQuAD script."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
    if not predictions:
        raise ValueError("no examples to score")
    em = sum(best_over_golds(exact_match, p, g) for p, g in zip(predictions, golds))
    f1 = sum(best_over_golds(token_f1, p, g) for p, g in zip(predictions, golds))
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "n": n}
