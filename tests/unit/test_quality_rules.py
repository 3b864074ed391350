"""Every quality rule, English and the Chinese character-based variant: a real text passes; a change of it
that breaks the published threshold is removed by exactly that rule; with the threshold turned off (or
moved) through the config it is not."""

import json
import re
from collections import Counter

import pytest

from lmforge.config import UserError
from lmforge.data import quality as q
from tests.conftest import TEST_DATA

WIKI = [json.loads(line)["text"] for line in (TEST_DATA / "web/wiki_en.jsonl").read_text().splitlines()]
GUWEN = ["\n".join(json.loads(line)["paragraphs"])
         for line in (TEST_DATA / "web/guwen_zh.jsonl").read_text(encoding="utf-8").splitlines()]
EN = WIKI[0]  # Wikipedia lead, 4 paragraphs, 434 words
ZH = GUWEN[0]  # 鄭伯克段於鄢, 7 paragraphs, 541 characters
SENTENCES = [s for s in re.split(r"(?<=\.)\s+", EN.replace("\n", " ")) if s.endswith(".")]
ZH_SENTENCES = [s + "。" for s in ZH.replace("\n", "").split("。") if s]
ZH_UNIQUE = "".join(dict.fromkeys(c for c in "".join(GUWEN) if c.isalnum()))  # distinct characters
STOPS = {"the", "be", "to", "of", "and", "that", "have", "with"}


def run(group, text, overrides=None):
    """The filter's verdict on ``text`` ("rule" or None) with ``overrides`` of ``group``'s thresholds."""
    t = q.resolve_thresholds({group: overrides or {}})[group]
    zh = group.endswith("_zh")
    base = group.removesuffix("_zh")
    if base == "gopher_quality":
        return (q.gopher_quality_zh if zh else q.gopher_quality)(text, t)
    if base == "gopher_repetition":
        return q.gopher_repetition(text, t, char_level=zh)
    if base == "c4":
        return q.c4(text, t, Counter(), char_level=zh)[0]
    return q.fineweb(text, t, char_level=zh)


def glue(words):
    return " ".join(a + b for a, b in zip(words[::2], words[1::2]))


EN_WORDS = EN.split()
LONG_WORDS = list(dict.fromkeys(w for w in EN_WORDS if len(w) >= 10))  # 3 per line: lines over 30 characters, 3 words each
# rules that only matter with another one relaxed (see quality.DEFAULTS["fineweb_zh"])
FIRST = {("fineweb_zh", "new_line_ratio"): {"short_line_thr": None}}
# (group, rule, text that breaks the published default, override that lets it through)
CASES = [
    ("gopher_quality", "min_doc_words", " ".join(EN_WORDS[:40]), {"min_doc_words": 30}),
    ("gopher_quality", "max_doc_words", " ".join([EN] * 240), {"max_doc_words": None}),
    ("gopher_quality", "min_avg_word_length", " ".join(w[:2] for w in EN_WORDS), {"min_avg_word_length": 1}),
    ("gopher_quality", "max_avg_word_length", glue(EN_WORDS), {"max_avg_word_length": 20}),
    ("gopher_quality", "max_hash_word_ratio",
     " ".join(w + (" #news" if i % 4 == 0 else "") for i, w in enumerate(EN_WORDS)), {"max_hash_word_ratio": 0.5}),
    ("gopher_quality", "max_ellipsis_word_ratio",
     " ".join(w + ("..." if i % 5 == 0 else "") for i, w in enumerate(EN_WORDS)), {"max_ellipsis_word_ratio": None}),
    ("gopher_quality", "max_bullet_lines_ratio", "\n".join("• " + s for s in SENTENCES),
     {"max_bullet_lines_ratio": 1.0}),
    ("gopher_quality", "max_ellipsis_lines_ratio", "\n".join(s[:-1] + "..." for s in SENTENCES),
     {"max_ellipsis_lines_ratio": None}),
    ("gopher_quality", "min_alpha_words_ratio", EN + " " + " ".join(str(1000 + i) for i in range(1500)),
     {"min_alpha_words_ratio": 0.2}),
    ("gopher_quality", "min_stop_words", " ".join(w for w in EN_WORDS if w.lower() not in STOPS),
     {"min_stop_words": 0}),
    ("gopher_repetition", "dup_para_frac", "\n\n".join(p for p in EN.split("\n") for _ in range(2)),
     {"dup_para_frac": None, "dup_para_char_frac": None, "dup_line_frac": None, "dup_line_char_frac": None,
      "dup_ngram_char_frac": None}),
    ("gopher_repetition", "dup_para_char_frac",
     "\n\n".join([EN.replace("\n", " ")] + WIKI[3].split("\n") + [EN.replace("\n", " ")]),
     {"dup_para_char_frac": 0.6, "dup_line_char_frac": 0.6, "dup_ngram_char_frac": None}),
    ("gopher_repetition", "dup_line_frac", "\n".join(SENTENCES[:6] + ["Read more."] * 5),
     {"dup_line_frac": 0.5}),
    ("gopher_repetition", "dup_line_char_frac", "\n".join(SENTENCES[:8] + [" ".join(SENTENCES[8:12])] * 2),
     {"dup_line_char_frac": 0.5, "dup_ngram_char_frac": None}),
    ("gopher_repetition", "top_2gram_char_frac",
     SENTENCES[0] + " " + " ".join(f"cheap flights {w}" for w in EN_WORDS[20:50]),
     {"top_ngram_char_frac": None, "dup_ngram_char_frac": None}),
    ("gopher_repetition", "dup_5gram_char_frac", " ".join(SENTENCES[:3] + [SENTENCES[3]] * 3),
     {"dup_ngram_char_frac": {"6": 0.9}}),
    ("gopher_quality_zh", "min_doc_chars", ZH_SENTENCES[0] + ZH_SENTENCES[1] + ZH_SENTENCES[2],
     {"min_doc_chars": 20}),
    ("gopher_quality_zh", "max_doc_chars", ZH * 400, {"max_doc_chars": None}),
    ("gopher_quality_zh", "max_hash_char_ratio", "".join(s + "#熱門#" for s in ZH_SENTENCES),
     {"max_hash_char_ratio": None}),
    ("gopher_quality_zh", "max_ellipsis_char_ratio", "".join(s[:6] + "……" for s in ZH_SENTENCES),
     {"max_ellipsis_char_ratio": 0.5}),
    ("gopher_quality_zh", "max_bullet_lines_ratio", "\n".join("• " + s for s in ZH_SENTENCES),
     {"max_bullet_lines_ratio": None}),
    ("gopher_quality_zh", "max_ellipsis_lines_ratio",
     "\n".join("".join(ZH_SENTENCES[i:i + 3])[:-1] + "…" for i in range(0, len(ZH_SENTENCES), 3)),
     {"max_ellipsis_lines_ratio": 1.0}),
    ("gopher_quality_zh", "min_text_chars_ratio", "".join(s + "★☆★☆★☆" for s in ZH_SENTENCES),
     {"min_text_chars_ratio": 0.3}),
    ("gopher_quality_zh", "min_stop_words", re.sub("[的了是在和有不之也而其以]", "", ZH), {"min_stop_words": None}),
    ("gopher_repetition_zh", "dup_para_frac", "\n\n".join(p for p in ZH.split("\n") for _ in range(2)),
     {"dup_para_frac": 0.6, "dup_para_char_frac": None, "dup_line_frac": None, "dup_line_char_frac": None,
      "dup_ngram_char_frac": None}),
    ("gopher_repetition_zh", "dup_para_char_frac",
     "\n\n".join([ZH.replace("\n", "")] + GUWEN[6].split("\n") + [ZH.replace("\n", "")]),
     {"dup_para_char_frac": 0.6, "dup_line_char_frac": 0.6, "dup_ngram_char_frac": None}),
    ("gopher_repetition_zh", "dup_line_frac", "\n".join(ZH_SENTENCES[:6] + ["點擊閱讀全文。"] * 5),
     {"dup_line_frac": 0.5}),
    ("gopher_repetition_zh", "dup_line_char_frac",
     "\n".join(ZH_SENTENCES[:8] + ["".join(ZH_SENTENCES[8:16])] * 2),
     {"dup_line_char_frac": 0.6, "dup_ngram_char_frac": None}),
    ("gopher_repetition_zh", "top_4gram_char_frac",
     ZH_SENTENCES[0] + "".join(f"特價機票{c}" for c in ZH.replace("\n", "")[40:80]),
     {"top_ngram_char_frac": None, "dup_ngram_char_frac": None}),
    ("c4", "min_sentences", " ".join(SENTENCES[:2]), {"min_sentences": 2}),
    ("c4", "lorem_ipsum", EN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", {"lorem_ipsum": False}),
    ("c4", "curly_bracket", EN + "\nCall embed({ id: 3 }) after the page has loaded.", {"curly_bracket": False}),
    ("c4_zh", "min_sentences", ZH_SENTENCES[0] + ZH_SENTENCES[1], {"min_sentences": 1}),
    ("c4_zh", "lorem_ipsum", ZH + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
     {"lorem_ipsum": False}),
    ("c4_zh", "curly_bracket", ZH + "\n請在頁面加載後調用embed({ id: 3 })函數。", {"curly_bracket": False}),
    ("fineweb", "line_punct_thr", "\n".join(s[:-1] for s in SENTENCES), {"line_punct_thr": None}),
    ("fineweb", "short_line_thr",
     "\n".join(" ".join(EN_WORDS[i:i + 3]) + "." for i in range(0, 300, 3)),
     {"short_line_thr": None, "new_line_ratio": None}),
    ("fineweb", "char_duplicates_ratio", "\n".join(SENTENCES + SENTENCES[2:3]), {"char_duplicates_ratio": 0.2}),
    ("fineweb", "new_line_ratio", "\n".join(" ".join(LONG_WORDS[i:i + 3]) + "." for i in range(0, len(LONG_WORDS) - 2, 3)),
     {"new_line_ratio": 0.5}),
    ("fineweb_zh", "line_punct_thr", "\n".join(s[:-1] for s in ZH_SENTENCES), {"line_punct_thr": 0.0}),
    ("fineweb_zh", "short_line_thr", "\n".join(ZH_UNIQUE[i:i + 4] + "。" for i in range(0, len(ZH_UNIQUE) - 3, 4)),
     {"short_line_thr": None, "new_line_ratio": None}),
    ("fineweb_zh", "char_duplicates_ratio", "\n".join(ZH_SENTENCES + ZH_SENTENCES[3:4]),
     {"char_duplicates_ratio": None}),
    ("fineweb_zh", "new_line_ratio", "\n".join(ZH_UNIQUE[i:i + 4] + "。" for i in range(0, len(ZH_UNIQUE) - 3, 4)),
     {"new_line_ratio": 0.3}),
]


def test_real_texts_pass_every_filter():
    for group, text in [("gopher_quality", EN), ("gopher_repetition", EN), ("c4", EN), ("fineweb", EN)]:
        assert run(group, text) is None, group
    for group in ("gopher_quality_zh", "gopher_repetition_zh", "c4_zh", "fineweb_zh"):
        for text in GUWEN[:4]:
            assert run(group, text) is None, (group, text[:20])


@pytest.mark.parametrize("group,rule,text,override", CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES])
def test_rule_fires_at_default_and_is_configurable(group, rule, text, override):
    first = FIRST.get((group, rule), {})
    assert run(group, text, first) == rule
    assert run(group, text, {**first, **override}) != rule


def test_every_rule_has_a_case():
    """Every threshold in quality.DEFAULTS, in both variants, is tested: a document rule by its own case in
    CASES (of that very group), an n-gram table by test_ngram_thresholds_each_n (which reads DEFAULTS), a C4
    line rule by test_c4_line_rules_count_and_drop_lines; the rest are settings of one of those rules."""
    settings = {"stop_words": "min_stop_words", "short_line_length": "short_line_thr"}
    c4_line_rules = {"terminal_punct", "min_words_per_line", "min_chars_per_line", "max_word_length", "javascript",
                     "policy", "citations"}
    ngram_tables = {"top_ngram_char_frac": "top_{}gram_char_frac", "dup_ngram_char_frac": "dup_{}gram_char_frac"}
    covered = {(g, r) for g, r, _, _ in CASES}
    missing = []
    for group, thresholds in q.DEFAULTS.items():
        for key, default in thresholds.items():
            if key in settings:
                assert settings[key] in thresholds, (group, key)  # the rule the setting belongs to is there
            elif group.removesuffix("_zh") == "c4" and key in c4_line_rules:
                assert isinstance(default, (bool, int)), (group, key)
            elif isinstance(default, dict):
                assert key in ngram_tables and default, (group, key)
            elif (group, key) not in covered:
                missing.append(f"{group}.{key}")
    assert not missing, f"rules in quality.DEFAULTS without a case in CASES: {missing}"
    # and every case is a rule that DEFAULTS has (a renamed or removed threshold leaves no stale case)
    for group, rule, _, _ in CASES:
        table = {fmt.format(n) for key, fmt in ngram_tables.items() for n in q.DEFAULTS[group].get(key, {})}
        assert rule in q.DEFAULTS[group] or rule in table, (group, rule)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_ngram_thresholds_each_n(lang):
    """Each top / duplicated n-gram threshold separately (the others off), at its published value."""
    group = "gopher_repetition" + ("_zh" if lang == "zh" else "")
    base = {"dup_para_frac": None, "dup_para_char_frac": None, "dup_line_frac": None, "dup_line_char_frac": None}
    for key, rule in (("top_ngram_char_frac", "top_{}gram_char_frac"), ("dup_ngram_char_frac", "dup_{}gram_char_frac")):
        for n, frac in q.DEFAULTS[group][key].items():
            n = int(n)
            if lang == "en":
                gram = " ".join(EN_WORDS[100:100 + n])
                text = " ".join(EN_WORDS[:20]) + " " + " ".join([gram] * 20)
            else:
                gram = ZH.replace("\n", "")[100:100 + n]
                text = ZH_SENTENCES[0] + "，".join([gram] * 8) + "。"
            other = "dup_ngram_char_frac" if key == "top_ngram_char_frac" else "top_ngram_char_frac"
            on = {**base, other: None, key: {str(n): frac}}
            assert run(group, text, on) == rule.format(n), (key, n)
            assert run(group, text, {**on, key: {str(n): 0.99}}) is None, (key, n)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_c4_line_rules_count_and_drop_lines(lang):
    zh = lang == "zh"
    body = ZH if zh else EN
    extra = (["閱讀更多", "謝謝閱讀！", "請啓用JavaScript以查看評論，評論系統由第三方提供。", "使用本網站即表示您同意我們的隱私政策和使用條款。",
              "鄭伯克段於鄢，見於左傳隱公元年，爲後世所傳誦。[1]", "x" * 1001 + "。"] if zh else
             ["Read more", "Thanks for reading!", "Please enable JavaScript to view the comments powered by Disqus.",
              "By using this site you agree to our terms of use and privacy policy.",
              "Anarchism has been described by many writers across the centuries.[1]", "x" * 1001 + "."])
    removed = Counter()
    t = q.resolve_thresholds(None)["c4_zh" if zh else "c4"]
    reason, kept = q.c4(body + "\n" + "\n".join(extra), t, removed, char_level=zh)
    assert reason is None
    assert removed == Counter({"no_terminal_punct": 1, ("too_few_chars" if zh else "too_few_words"): 1,
                               "javascript": 1, "policy": 1, "long_word": 1})
    assert kept.startswith(body.split("\n")[0]) and "[1]" not in kept
    assert extra[4].replace("[1]", "") in kept.split("\n")
    # each line rule can be turned off
    off = {**t, "terminal_punct": False, "javascript": False, "policy": False, "max_word_length": None,
           "citations": False}
    if zh:
        off["min_chars_per_line"] = None
    else:
        off["min_words_per_line"] = None
    removed = Counter()
    _, kept = q.c4(body + "\n" + "\n".join(extra), off, removed, char_level=zh)
    assert not removed and all(e in kept.split("\n") for e in extra)


def test_quality_filters_pick_the_variant_by_language():
    f = q.QualityFilters(list(q.FILTERS))
    lines = Counter()
    assert f.check(EN, "en", lines) == (None, EN)
    reason, _ = f.check(ZH, "en", lines)  # word rules on Chinese: 7 "words"
    assert reason == "gopher_quality.min_doc_words"
    reason, kept = f.check("標題\n" + ZH, "zh", lines)
    assert reason is None and kept == ZH and lines["c4_zh.no_terminal_punct"] == 1


def test_bad_config_and_names():
    with pytest.raises(UserError, match="'c5' is not a filter"):
        q.resolve_thresholds({"c5": {}})
    with pytest.raises(UserError, match="must be a number"):
        q.resolve_thresholds({"fineweb": {"line_punct_thr": "high"}})
    with pytest.raises(UserError, match="maps n"):
        q.resolve_thresholds({"gopher_repetition": {"top_ngram_char_frac": {"two": 0.2}}})
    with pytest.raises(UserError, match="true or false"):
        q.resolve_thresholds({"c4": {"policy": 1}})
    assert q.expand_names("gopher,fineweb") == ["gopher_repetition", "gopher_quality", "fineweb"]
    assert q.expand_names("all") == list(q.FILTERS)
