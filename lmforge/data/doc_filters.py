"""The per-document filter pipeline of ``prepare``: language ID -> language routing -> quality filters ->
decontamination, with a count for every decision.

``prepare`` builds a :class:`FilterSpec` from its flags (validated in the main process, pickled to the
workers), each worker builds the :class:`DocFilters` for it once (the language model, the eval-set
n-gram indexes) and calls :meth:`DocFilters.apply` on every document; the per-task
:class:`FilterReport` objects are merged in task order into the run's report (``index.json`` →
``cleaning.filters``). Deduplication stays where it is (after this, in ``prepare``'s main process), so
duplicates are counted among the documents that passed the filters.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import UserError, loads_bounded, read_json_bounded
from lmforge.data import decontaminate as decon
from lmforge.data import langid, quality


@dataclass(frozen=True)
class FilterSpec:
    """What to run; hashable and picklable (``thresholds`` is the JSON of the resolved thresholds)."""

    langs: tuple[str, ...] = ()
    lang_min_score: float = langid.DEFAULT_MIN_SCORE
    quality: tuple[str, ...] = ()
    thresholds: str = ""
    decontaminate: tuple[str, ...] = ()
    decontaminate_mode: str = "drop"
    ngram: int = decon.DEFAULT_NGRAM

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = json.loads(self.thresholds) if self.thresholds else None
        return d


def make_spec(lang: str | list[str] | None = None, lang_min_score: float = langid.DEFAULT_MIN_SCORE,
              quality_filters: str | list[str] | None = None, quality_config: str | dict | None = None,
              decontaminate: list[str] | str | None = None, decontaminate_mode: str = "drop",
              decontaminate_ngram: int = decon.DEFAULT_NGRAM) -> FilterSpec | None:
    """Validate the flags into a spec (None when no filter is asked for). Errors name the flag."""
    langs = tuple(langid.parse_languages(lang)) if lang else ()
    if not 0.0 <= lang_min_score <= 1.0:
        raise UserError(f"--lang-min-score={lang_min_score} must be a probability in [0, 1]")
    names = tuple(quality.expand_names(quality_filters))
    if quality_config is not None and not names:
        raise UserError("--quality-config was given without --quality; add e.g. --quality gopher,c4,fineweb")
    thresholds = quality.resolve_thresholds(_load_config(quality_config)) if names else None
    if isinstance(decontaminate, str):
        decontaminate = [decontaminate]
    paths = tuple(decon.check_paths(list(decontaminate or [])))
    if decontaminate_mode not in decon.MODES:
        raise UserError(f"--decontaminate-mode={decontaminate_mode!r} is not one of {', '.join(decon.MODES)}")
    if decontaminate_ngram < 1:
        raise UserError(f"--decontaminate-ngram={decontaminate_ngram} must be at least 1 (13 is the default)")
    if not (langs or names or paths):
        return None
    return FilterSpec(langs=langs, lang_min_score=float(lang_min_score), quality=names,
                      thresholds=json.dumps(thresholds, sort_keys=True) if thresholds else "",
                      decontaminate=paths, decontaminate_mode=decontaminate_mode, ngram=int(decontaminate_ngram))


def _load_config(config: str | dict | None) -> dict | None:
    """``--quality-config``: a JSON file, or inline JSON (``'{"c4": {"min_sentences": 2}}'``)."""
    if config is None or isinstance(config, dict):
        return config
    if not config.strip():
        raise UserError("--quality-config is empty; pass a JSON file or inline JSON")
    example = "'{\"gopher_quality\": {\"min_doc_words\": 30}}'"
    p = Path(config).expanduser()
    if not config.lstrip().startswith(("{", "[")) and p.is_dir():
        raise UserError(f"--quality-config {config} is a directory; pass a JSON file or inline JSON such as {example}")
    if not config.lstrip().startswith(("{", "[")) and p.is_file():
        obj = read_json_bounded(p, "--quality-config file", max_bytes=1 << 20)
    else:
        try:
            obj = loads_bounded(config, "--quality-config", max_chars=1 << 20)
        except json.JSONDecodeError as e:
            if not config.lstrip().startswith(("{", "[")):  # neither a file nor JSON: name the missing file
                raise UserError(f"--quality-config {config}: no such file; pass a JSON file or inline JSON "
                                f"such as {example}") from None
            raise UserError(f"--quality-config is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(obj, dict):
        raise UserError("--quality-config must be a JSON object: {\"filter\": {\"threshold\": value}}")
    return obj


@dataclass
class FilterReport:
    """Counts from one task (merged across tasks by ``merge``)."""

    documents_in: int = 0
    documents_out: int = 0
    languages: Counter = field(default_factory=Counter)  # detected language of every document checked
    languages_kept: Counter = field(default_factory=Counter)
    language_dropped: Counter = field(default_factory=Counter)  # not one of --lang, by language
    language_low_score: int = 0  # one of --lang, but below --lang-min-score
    quality_dropped: Counter = field(default_factory=Counter)  # "filter.rule" -> documents
    c4_lines_removed: Counter = field(default_factory=Counter)
    decontaminated: int = 0  # documents dropped (mode drop) or flagged (mode report)
    eval_docs: Counter = field(default_factory=Counter)  # set -> documents sharing an n-gram with it
    eval_items: dict[str, set[int]] = field(default_factory=dict)  # set -> its items seen in documents
    eval_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # set -> (items, too short)

    def merge(self, other: FilterReport | None) -> None:
        if other is None:
            return
        self.documents_in += other.documents_in
        self.documents_out += other.documents_out
        self.language_low_score += other.language_low_score
        self.decontaminated += other.decontaminated
        for name in ("languages", "languages_kept", "language_dropped", "quality_dropped", "c4_lines_removed",
                     "eval_docs"):
            getattr(self, name).update(getattr(other, name))
        for k, v in other.eval_items.items():
            self.eval_items.setdefault(k, set()).update(v)
        self.eval_sizes.update(other.eval_sizes)

    def as_dict(self, spec: FilterSpec) -> dict[str, Any]:
        out: dict[str, Any] = {"documents_in": self.documents_in, "documents_out": self.documents_out,
                               "languages": dict(self.languages.most_common())}
        if spec.langs:
            out.update(lang=list(spec.langs), languages_kept=dict(self.languages_kept.most_common()),
                       language_dropped=dict(self.language_dropped.most_common()),
                       language_low_score=self.language_low_score)
        if spec.quality:
            out["quality"] = list(spec.quality)
            out["quality_dropped"] = dict(sorted(self.quality_dropped.items()))
            out["quality_dropped_total"] = sum(self.quality_dropped.values())
            if "c4" in spec.quality:
                out["c4_lines_removed"] = dict(sorted(self.c4_lines_removed.items()))
        if spec.decontaminate:
            sets = {}
            for name in decon.set_names(list(spec.decontaminate)):
                items, short = self.eval_sizes.get(name, (0, 0))
                sets[name] = {"items": items, "items_too_short": short,
                              "documents_matched": self.eval_docs.get(name, 0),
                              "items_matched": len(self.eval_items.get(name, ()))}
            out["decontamination"] = {
                "mode": spec.decontaminate_mode, "ngram": spec.ngram,
                "documents_" + ("dropped" if spec.decontaminate_mode == "drop" else "flagged"): self.decontaminated,
                "sets": sets}
        return out


class DocFilters:
    """The pipeline for one spec (built once per worker process by :func:`pipeline`)."""

    def __init__(self, spec: FilterSpec):
        self.spec = spec
        self.need_lang = bool(spec.langs or spec.quality)
        self.langs = frozenset(spec.langs)
        self.quality = (quality.QualityFilters(list(spec.quality), json.loads(spec.thresholds))
                        if spec.quality else None)
        self.decon = decon.Decontaminator(list(spec.decontaminate), spec.ngram) if spec.decontaminate else None
        if self.need_lang:
            langid.detect("warm up")  # load the model now, not inside the first document

    def new_report(self) -> FilterReport:
        r = FilterReport()
        if self.decon is not None:
            r.eval_sizes = {s.name: (s.items, s.too_short) for s in self.decon.sets}
        return r

    def apply(self, doc: str, report: FilterReport) -> str | None:
        """The document to keep (C4 may have dropped lines from it) or None; every decision is counted."""
        report.documents_in += 1
        lang = ""
        if self.need_lang:
            lang, score = langid.detect(doc)
            report.languages[lang] += 1
            if self.langs:
                if lang not in self.langs:
                    report.language_dropped[lang] += 1
                    return None
                if score < self.spec.lang_min_score:
                    report.language_low_score += 1
                    return None
        if self.quality is not None:
            reason, doc = self.quality.check(doc, lang, report.c4_lines_removed)
            if reason is not None:
                report.quality_dropped[reason] += 1
                return None
        if self.decon is not None:
            hits = self.decon.match(doc)
            if hits:
                report.decontaminated += 1
                for name, items in hits.items():
                    report.eval_docs[name] += 1
                    report.eval_items.setdefault(name, set()).update(items)
                if self.spec.decontaminate_mode == "drop":
                    return None
        report.documents_out += 1
        if lang:
            report.languages_kept[lang] += 1
        return doc


_PIPELINES: dict[FilterSpec, DocFilters] = {}


def pipeline(spec: FilterSpec) -> DocFilters:
    """The process's pipeline for ``spec`` (the language model and eval indexes are built once)."""
    if spec not in _PIPELINES:
        _PIPELINES.clear()
        _PIPELINES[spec] = DocFilters(spec)
    return _PIPELINES[spec]
