"""Text helpers shared by the metrics: CJK detection and mixed Chinese/English tokenization.

Chinese has no spaces between words, so the metrics score it per character (the CMRC / LCSTS
convention); runs of Latin letters and digits inside Chinese text stay whole words.
"""

from __future__ import annotations

import re

# CJK Unified Ideographs (+ Extension A, Compatibility Ideographs), kana and Hangul syllables.
CJK_RANGES = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
CJK_CHAR = re.compile(f"[{CJK_RANGES}]")
_MIXED_TOKEN = re.compile(f"[{CJK_RANGES}]|[^\\s{CJK_RANGES}]+")


def is_cjk_char(ch: str) -> bool:
    return bool(CJK_CHAR.fullmatch(ch))


def has_cjk(text: str) -> bool:
    return CJK_CHAR.search(text) is not None


def cjk_fraction(texts) -> float:
    """Share of non-space characters that are CJK over an iterable of strings (0 for no text)."""
    cjk = total = 0
    for t in texts:
        for ch in t:
            if not ch.isspace():
                total += 1
                cjk += is_cjk_char(ch)
    return cjk / total if total else 0.0


def mixed_tokens(text: str) -> list[str]:
    """Split on whitespace, and additionally make every CJK character its own token.

    ``"用 PyTorch 训练"`` -> ``["用", "PyTorch", "训", "练"]``.
    """
    return _MIXED_TOKEN.findall(text)
