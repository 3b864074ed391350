"""Translation metrics through sacrebleu: corpus BLEU and chrF.

Chinese targets use sacrebleu's ``zh`` tokenizer (each CJK character split off), everything else its
default ``13a``; chrF works on characters and needs no tokenizer. Examples may carry several references
(e.g. Tatoeba sentences translated more than once); missing ones are passed to sacrebleu as ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.eval.text import cjk_fraction


def bleu_tokenizer_for(references: Sequence[Sequence[str]]) -> str:
    """"zh" when the references are mostly Chinese characters, else sacrebleu's default "13a"."""
    return "zh" if cjk_fraction(r for refs in references for r in refs) > 0.3 else "13a"


def _ref_streams(references: Sequence[Sequence[str] | str]) -> list[list[str | None]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not r for r in refs):
        raise ValueError("an example needs at least one reference translation")
    width = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(width)]


def translation_scores(predictions: Sequence[str], references: Sequence[Sequence[str] | str],
                       tokenize: str | None = None) -> dict[str, float | str]:
    """{"bleu", "chrf", "bleu_tokenize", "bleu_signature", "chrf_signature", "n"} (scores in 0-100)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
    if not predictions:
        raise ValueError("no examples to score")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    tokenize = tokenize or bleu_tokenizer_for(refs)
    streams = _ref_streams(refs)
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    b = bleu.corpus_score(list(predictions), streams)
    c = chrf.corpus_score(list(predictions), streams)
    return {"bleu": b.score, "chrf": c.score, "bleu_tokenize": tokenize,
            "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
            "n": len(predictions)}
