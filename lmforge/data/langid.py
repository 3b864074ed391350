"""Language identification with the model that ships inside the ``langid`` package (97 languages).

Nothing is downloaded: ``langid.py`` (Lui & Baldwin, 2012) carries its naive-Bayes model in the installed
package itself. Probabilities are normalised (``norm_probs=True``) so a confidence threshold means the
same thing on every document. Codes are ISO 639-1 (``en``, ``zh``, ``ja``, ``fr`` …).

A page is classified as a whole (its majority language); only the first ``MAX_CHARS`` characters are read,
which is plenty for a confident answer and keeps very long pages cheap.
"""

from __future__ import annotations

from lmforge.config import UserError

MAX_CHARS = 20_000
DEFAULT_MIN_SCORE = 0.65  # FineWeb's fastText threshold for English (Penedo et al., 2024)
_IDENTIFIER = None


def _identifier():
    """The packaged model, loaded once per process (~1.5 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from langid.langid import LanguageIdentifier, model
        except ImportError:
            raise UserError("language identification needs the `langid` package; "
                            "pip install 'lmforge[web]'") from None
        # The model string is part of the installed package (code we already trust), not a user file.
        _IDENTIFIER = LanguageIdentifier.from_modelstring(model, norm_probs=True)
    return _IDENTIFIER


def supported_languages() -> list[str]:
    return sorted(_identifier().nb_classes)


def detect(text: str) -> tuple[str, float]:
    """(language code, probability) of ``text``'s majority language."""
    lang, prob = _identifier().classify(text[:MAX_CHARS])
    return str(lang), float(prob)


def parse_languages(spec: str | list[str] | None) -> list[str]:
    """``"en,zh"`` -> ``["en", "zh"]``, each checked against the model's languages."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    langs = [s.strip().lower() for s in items if s and s.strip()]
    if not langs:
        raise UserError("--lang is empty; pass ISO 639-1 codes such as en,zh")
    known = set(supported_languages())
    bad = [x for x in langs if x not in known]
    if bad:
        raise UserError(f"--lang {','.join(bad)}: not a language the packaged model knows; use ISO 639-1 "
                        f"codes such as en,zh,fr (known: {', '.join(sorted(known))})")
    return list(dict.fromkeys(langs))
