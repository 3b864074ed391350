"""ROUGE-1 / ROUGE-2 / ROUGE-L (Lin, 2004), written out: clipped n-gram overlap and the longest
common subsequence, each as precision, recall and F1.

Tokenization follows Google's ``rouge-score`` default (lower case, runs of ``[a-z0-9]`` are tokens,
everything else separates them; no stemming) and extends it to Chinese: every CJK character is a token,
so Chinese is scored per character. With several references an example takes its best F1 per metric
(``rouge-score``'s ``score_multi``); the corpus score is the mean over examples, in percent.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from lmforge.eval.text import CJK_RANGES

_TOKEN = re.compile(f"[{CJK_RANGES}]|[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """``"The cat's 2 hats!"`` -> ``["the", "cat", "s", "2", "hats"]``; ``"猫在垫子上"`` -> 5 characters."""
    return _TOKEN.findall(text.lower())


def _prf(overlap: int, n_pred: int, n_ref: int) -> dict[str, float]:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(pred_tokens: Sequence[str], ref_tokens: Sequence[str], n: int) -> dict[str, float]:
    """Clipped n-gram overlap: each reference n-gram matches at most as often as it occurs."""
    pred, ref = _ngrams(pred_tokens, n), _ngrams(ref_tokens, n)
    overlap = sum((pred & ref).values())
    return _prf(overlap, sum(pred.values()), sum(ref.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a)·len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> dict[str, float]:
    """Sentence-level ROUGE-L: P = LCS/|pred|, R = LCS/|ref|, F1 their harmonic mean."""
    return _prf(lcs_length(pred_tokens, ref_tokens), len(pred_tokens), len(ref_tokens))


def rouge(prediction: str, reference: str) -> dict[str, dict[str, float]]:
    """{"rouge1": {precision, recall, f1}, "rouge2": ..., "rougeL": ...} for one pair."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    return {"rouge1": rouge_n(p, r, 1), "rouge2": rouge_n(p, r, 2), "rougeL": rouge_l(p, r)}


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """Corpus ROUGE-1/2/L F1 in percent: per example the best F1 over its references, then the mean."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        raise ValueError("no examples to score")
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, refs in zip(predictions, references):
        if isinstance(refs, str):
            refs = [refs]
        if not refs:
            raise ValueError("an example needs at least one reference summary")
        scores = [rouge(pred, ref) for ref in refs]
        for key in totals:
            totals[key] += max(s[key]["f1"] for s in scores)
    n = len(predictions)
    return {**{k: 100.0 * v / n for k, v in totals.items()}, "n": n}
