"""Classification metrics: accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix."""

from __future__ import annotations

from collections.abc import Hashable, Sequence


def confusion_matrix(golds: Sequence[Hashable], preds: Sequence[Hashable],
                     labels: Sequence[Hashable]) -> list[list[int]]:
    """matrix[i][j] = examples whose gold label is labels[i] and prediction labels[j]."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for g, p in zip(golds, preds):
        for lab in (g, p):
            if lab not in index:
                raise ValueError(f"label {lab!r} is not one of {list(labels)}")
        m[index[g]][index[p]] += 1
    return m


def classification_scores(golds: Sequence[Hashable], preds: Sequence[Hashable],
                          labels: Sequence[Hashable] | None = None) -> dict:
    """Accuracy and macro-F1 in percent, per-class P/R/F1, and the confusion matrix (rows = gold).

    ``labels`` fixes the class list (default: every label seen, sorted). A class with no predictions
    (or no gold examples) gets precision (recall) 0, as scikit-learn's ``zero_division=0``; macro-F1 is
    the unweighted mean of per-class F1 over ``labels``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} examples")
    if not golds:
        raise ValueError("no examples to score")
    if labels is None:
        labels = sorted(set(golds) | set(preds), key=str)
    labels = list(labels)
    m = confusion_matrix(golds, preds, labels)
    per_class = {}
    for i, lab in enumerate(labels):
        tp = m[i][i]
        n_pred = sum(m[k][i] for k in range(len(labels)))
        n_gold = sum(m[i])
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_gold if n_gold else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[str(lab)] = {"precision": p, "recall": r, "f1": f, "support": n_gold}
    correct = sum(m[i][i] for i in range(len(labels)))
    majority = max(sum(row) for row in m)
    return {
        "accuracy": 100.0 * correct / len(golds),
        "macro_f1": 100.0 * sum(c["f1"] for c in per_class.values()) / len(labels),
        "majority_baseline": 100.0 * majority / len(golds),
        "labels": [str(lab) for lab in labels],
        "confusion_matrix": m,
        "per_class": per_class,
        "n": len(golds),
    }
