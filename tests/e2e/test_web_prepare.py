"""End to end: a realistic crawl (WARC + WET + HTML built from real texts wrapped in boilerplate) through
``prepare`` with language routing, quality filters, near dedup and decontamination; the shards are decoded
and checked page by page against what each page is (tests/data/web/build_crawl.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import UserError
from lmforge.data.doc_filters import make_spec
from lmforge.data.prepare import prepare
from lmforge.data.shards import read_index
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer
from tests.conftest import TEST_DATA
from tests.data.web.build_crawl import build_crawl
from tests.unit.test_data_prepare import docs_of

BOILERPLATE = ["cookies", "Cookie", "Privacy policy", "Terms of use", "All rights reserved", "Subscribe",
               "Related posts", "Most read", "Share:", "powered by WordPress", "window.dataLayer", "font-family",
               "分享到", "版权所有", "隐私政策", "热门文章", "首页"]


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    out = tmp_path_factory.mktemp("crawl")
    built = build_crawl(out)
    built["dir"] = out
    built["inputs"] = [str(out / "crawl.warc.gz"), str(out / "pages"), str(out / "crawl.wet.gz")]
    return built


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("webtok") / "tok"
    train_tokenizer([str(TEST_DATA / "web" / "wiki_en.jsonl"), str(TEST_DATA / "web" / "guwen_zh.jsonl")], 700,
                    out, text_field="text,paragraphs", progress=False)
    return out


def test_crawl_en_zh_filtered_deduplicated_decontaminated(tmp_path, crawl, tok_dir):
    spec = make_spec(lang="en,zh", quality_filters="all",
                     decontaminate=[str(crawl["eval_squad"]), str(crawl["eval_tangshi"])])
    out = tmp_path / "shards"
    r = prepare(crawl["inputs"], tok_dir, out, dedup="near", progress=False, filters=spec)

    # reading: 24 WARC pages + 2 HTML files + 2 WET records; requests/warcinfo/image/robots skipped
    assert r["documents_read"] == 28
    assert r["web"] == {"pages": 28, "skipped_records": 24 + 1 + 2 + 1, "no_main_text": 0}
    f = r["filters"]
    assert f["languages"] == {"en": 17, "zh": 11}  # mixed pages go to their majority language
    assert f["language_dropped"] == {} and f["language_low_score"] == 0
    assert f["quality_dropped"] == {
        "c4.curly_bracket": 1,  # the page with an embed({ ... }) snippet
        "c4.lorem_ipsum": 1,  # the draft with placeholder text
        "gopher_quality.min_doc_words": 1,  # the 404 stub
        "gopher_repetition.dup_5gram_char_frac": 1,  # the keyword-stuffed deals page
        "gopher_repetition_zh.dup_line_frac": 1,  # the Chinese page repeating one poem line
    }
    # every kept page lost its title line (no terminal punctuation) to C4's line rule
    assert f["c4_lines_removed"]["c4.no_terminal_punct"] >= 17 - 5
    d = f["decontamination"]
    assert d["mode"] == "drop" and d["ngram"] == 13 and d["documents_dropped"] == 2
    squad, tang = d["sets"]["eval_squad.jsonl"], d["sets"]["eval_tangshi.json"]
    assert squad["documents_matched"] == 1 and tang["documents_matched"] == 1
    # the quoted SQuAD paragraph is the context of every question about it; one poem is quoted
    assert squad["items_matched"] == sum(1 for line in crawl["eval_squad"].read_text().splitlines()
                                         if json.loads(line)["context"].startswith("Super Bowl 50 was"))
    assert tang["items"] == 120 and tang["items_matched"] == 1
    assert f["documents_in"] == 28 and f["documents_out"] == 28 - 5 - 2
    assert r["removed_exact_duplicates"] == 2  # one article mirrored on a second site, en and zh
    assert r["removed_near_duplicates"] == 1  # the updated copy
    assert r["documents_kept"] == 28 - 5 - 2 - 3

    # what the shards hold: main text only, each clean article once
    tok = load_tokenizer(tok_dir)
    docs = docs_of(out, tok)
    assert len(docs) == r["documents_kept"]
    text = "\n".join(docs)
    for b in BOILERPLATE:
        assert b not in text, b
    by_kind = {}
    for p in crawl["warc"] + crawl["html"]:
        by_kind.setdefault(p["kind"], []).append(p)
    flat = [" ".join(doc.split()) for doc in docs]  # extraction collapses runs of spaces
    for p in by_kind["article_en"] + by_kind["article_zh"] + by_kind["mixed_en"] + by_kind["mixed_zh"]:
        first = " ".join(p["paragraphs"][0].split())
        assert sum(first in doc for doc in flat) == 1, p["url"]
    for kind in ("spam_en", "lorem_en", "code_en", "stub_en", "spam_zh", "quotes_squad", "quotes_poem"):
        marker = by_kind[kind][0]["paragraphs"][-1][:40]
        assert not any(marker in doc for doc in docs), kind
    assert not any("last updated in March 2024" in doc for doc in docs)  # the near duplicate went
    assert read_index(out)["config"]["filters"]["langs"] == ["en", "zh"]


def test_lang_en_routes_and_report_mode_keeps(tmp_path, crawl, tok_dir):
    spec = make_spec(lang="en", quality_filters="gopher,c4,fineweb", decontaminate=[str(crawl["eval_squad"])],
                     decontaminate_mode="report")
    r = prepare(crawl["inputs"], tok_dir, tmp_path / "en", dedup="near", progress=False, filters=spec)
    f = r["filters"]
    assert f["language_dropped"] == {"zh": 11} and f["languages_kept"] == {"en": 17 - 4}
    assert f["quality_dropped_total"] == 4
    d = f["decontamination"]
    assert d["documents_flagged"] == 1 and "documents_dropped" not in d
    assert d["sets"]["eval_squad.jsonl"]["documents_matched"] == 1
    # flagged, not dropped: the quoting page is in the shards; 2 duplicates removed
    assert r["documents_kept"] == 17 - 4 - 2
    tok = load_tokenizer(tok_dir)
    docs = docs_of(tmp_path / "en", tok)
    assert any("Super Bowl 50 was an American football game" in doc for doc in docs)
    assert not any("鄭" in doc or "曹劌" in doc for doc in docs if "classical Chinese" not in doc)


@pytest.mark.slow
def test_cli_prepare_web_crawl_two_workers(tmp_path, crawl, tok_dir):
    """The flags through the real CLI, with worker processes (the spec is pickled to them)."""
    out = tmp_path / "cli"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmforge", "prepare", "--input", *crawl["inputs"], "--tokenizer", str(tok_dir),
           "--out", str(out), "--dedup", "near", "--workers", "2", "--lang", "en,zh", "--quality", "all",
           "--quality-config", json.dumps({"gopher_quality": {"min_doc_words": None}}),
           "--decontaminate", str(crawl["eval_squad"]), str(crawl["eval_tangshi"]), "--json", "--no-progress"]
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[2])
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    f = r["filters"]
    # the stub page is no longer too short (min_doc_words off): it is dropped by a later rule instead
    assert "gopher_quality.min_doc_words" not in f["quality_dropped"]
    assert f["quality_dropped_total"] == 5 and f["decontamination"]["documents_dropped"] == 2
    assert r["documents_kept"] == 18
    assert read_index(out)["config"]["filters"]["thresholds"]["gopher_quality"]["min_doc_words"] is None


def test_bad_filter_flags_are_one_line_errors(tmp_path, crawl, tok_dir):
    with pytest.raises(UserError, match="--lang xx"):
        make_spec(lang="en,xx")
    with pytest.raises(UserError, match="--quality 'gopherr'"):
        make_spec(quality_filters="gopherr")
    with pytest.raises(UserError, match=r"c4\.min_words is not a threshold"):
        make_spec(quality_filters="c4", quality_config={"c4": {"min_words": 3}})
    with pytest.raises(UserError, match="--decontaminate .*no such file"):
        make_spec(decontaminate=[str(tmp_path / "missing.jsonl")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lmforge", "prepare", "--input", crawl["inputs"][0], "--tokenizer",
                        str(tok_dir), "--out", str(tmp_path / "x"), "--quality", "c4", "--quality-config", "{bad"],
                       check=False, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: --quality-config is not valid JSON")
    assert "Traceback" not in p.stderr and not (tmp_path / "x").exists()
