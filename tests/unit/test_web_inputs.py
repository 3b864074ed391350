"""Web inputs (WARC / WET / HTML), language ID, decontamination matching and the filter pipeline's counts."""

import io
import json
import pickle

import pytest

from lmforge.config import UserError
from lmforge.data import doc_filters, langid
from lmforge.data.decontaminate import Decontaminator, EvalSet, read_items, tokens
from lmforge.sources import ReadStats, file_format, iter_documents, iter_file_documents
from tests.conftest import TEST_DATA
from tests.data.web.build_crawl import page_html, write_wet

WIKI = [json.loads(line) for line in (TEST_DATA / "web/wiki_en.jsonl").read_text().splitlines()]
GUWEN = [json.loads(line) for line in (TEST_DATA / "web/guwen_zh.jsonl").read_text(encoding="utf-8").splitlines()]


def _warc(path, records):
    """records: (url, content_type or None for a request, payload bytes)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=str(path).endswith(".gz"))
        w.write_record(w.create_warcinfo_record(path.name, {"software": "test"}))
        for url, ctype, payload in records:
            if ctype is None:
                h = StatusAndHeaders("GET / HTTP/1.1", [("Host", "x.example")], is_http_request=True)
                w.write_record(w.create_warc_record(url, "request", http_headers=h))
                continue
            h = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(payload), http_headers=h))


def test_warc_pages_extracted_other_records_skipped(tmp_path):
    en = WIKI[1]
    page = page_html("a", en["title"], en["text"].split("\n"), ["Other article"]).encode()
    zh = GUWEN[1]
    page_zh = page_html("c", zh["title"], zh["paragraphs"], ["其他"]).encode("gb18030")
    page_zh = page_zh.replace(b'charset="utf-8"', b'charset="gb18030"')  # a GBK-family page, declared
    for name in ("crawl.warc", "crawl.warc.gz"):
        path = tmp_path / name
        _warc(path, [("https://x.example/1", None, b""), ("https://x.example/1", "text/html; charset=utf-8", page),
                     ("https://x.example/logo.png", "image/png", b"\x89PNG" + bytes(40)),
                     ("https://x.example/notes.txt", "text/plain", b"Plain notes, taken as they are."),
                     ("https://x.example/2", "text/html", page_zh),
                     ("https://x.example/empty", "text/html", b"<html><body><script>var a = 1;</script></body></html>")])
        assert file_format(str(path)) == "warc"
        stats = ReadStats()
        docs = list(iter_file_documents(str(path), stats=stats))
        assert len(docs) == 3
        assert docs[0].split("\n")[1:] == en["text"].split("\n")  # title line, then the paragraphs
        assert "cookies" not in docs[0] and "Privacy policy" not in docs[0] and "Most read" not in docs[0]
        assert docs[1] == "Plain notes, taken as they are."
        assert zh["paragraphs"][0] in docs[2] and "版权所有" not in docs[2]
        assert (stats.web_pages, stats.web_skipped_records, stats.web_no_main_text) == (4, 3, 1)
        assert stats.documents == 3


def test_wet_and_html_files_and_directories(tmp_path):
    write_wet(tmp_path / "a.wet.gz", [("https://x.example/0", WIKI[2]["text"])])
    (tmp_path / "p.htm").write_text(page_html("b", WIKI[3]["title"], [WIKI[3]["text"]], []), encoding="utf-8")
    (tmp_path / "skip.png").write_bytes(b"\x89PNG")
    stats = ReadStats()
    docs = list(iter_documents([str(tmp_path)], stats=stats))  # a directory: web files are picked up
    assert docs[0] == WIKI[2]["text"]
    assert " ".join(WIKI[3]["text"].split()) in docs[1] and "powered by WordPress" not in docs[1]
    assert stats.skipped_files == 1 and stats.web_pages == 2


def test_bad_warc_is_a_user_error(tmp_path):
    bad = tmp_path / "broken.warc.gz"
    bad.write_bytes(b"this is not a WARC file at all\n" * 3)
    with pytest.raises(UserError, match="broken.warc.gz' is not a readable WARC/WET archive"):
        list(iter_file_documents(str(bad)))


def test_language_id_packaged_model():
    assert langid.detect(WIKI[0]["text"])[0] == "en"
    lang, p = langid.detect("\n".join(GUWEN[0]["paragraphs"]))
    assert lang == "zh" and p > 0.99
    assert langid.parse_languages("EN, zh,en") == ["en", "zh"]
    with pytest.raises(UserError, match="--lang klingon"):
        langid.parse_languages("en,klingon")


def test_tokens_words_and_cjk_characters():
    assert tokens("Hello, World! 床前明月光，疑是 abc中文def 12") == [
        "hello", "world", "床", "前", "明", "月", "光", "疑", "是", "abc", "中", "文", "def", "12"]


def _eval_file(tmp_path, name, items):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in items) + "\n", encoding="utf-8")
    return str(p)


def test_decontamination_ngram_boundary_en_and_zh(tmp_path):
    question = " ".join(WIKI[4]["text"].split()[40:70])
    poem = "".join(GUWEN[2]["paragraphs"][0])[:30]
    ev = _eval_file(tmp_path, "ev.jsonl", [{"q": question, "a": "short answer"}, {"q": poem}, {"q": "too short"}])
    d = Decontaminator([ev], n=13)
    s = d.sets[0]
    assert (s.items, s.too_short) == (3, 1)
    other = " ".join(WIKI[5]["text"].split()[:50])
    qt = tokens(question)
    # 12 shared tokens: no match; 13: a match (punctuation and case do not matter)
    assert d.match(other + " " + " ".join(qt[:12]) + " " + other) == {}
    hit = other + " " + " ".join(qt[:13]).upper().replace(" ", ", ") + " " + other
    assert d.match(hit) == {"ev.jsonl": {0}}
    # Chinese: 13 characters, punctuation ignored
    zh_other = "".join(GUWEN[3]["paragraphs"])[:60]
    chars = tokens(poem)  # the poem's characters without punctuation
    assert d.match(zh_other + "".join(chars[:12]) + zh_other) == {}
    assert d.match(zh_other + "，".join(chars[:13]) + zh_other) == {"ev.jsonl": {1}}


def test_eval_set_formats_and_shared_texts(tmp_path):
    ctx = WIKI[6]["text"]
    items = [{"question": f"question number {i}?", "context": ctx} for i in range(4)]
    ev = EvalSet("e", _eval_file(tmp_path, "e.jsonl", items), 13)
    assert ev.items == 4 and len(ev.text_items) == 1 and ev.text_items[0] == [0, 1, 2, 3]
    d = Decontaminator([str(tmp_path / "e.jsonl")])
    assert d.match("Quoted: " + ctx.split("\n")[0]) == {"e.jsonl": {0, 1, 2, 3}}
    poems = TEST_DATA / "chinese_poetry/classics/tangshi_300.json"
    first = read_items(str(poems))[0]
    assert "西陸蟬聲唱，南冠客思侵。\n那堪玄鬢影" in "".join(first)  # a poem's lines are one text
    txt = tmp_path / "lines.txt"
    txt.write_text("first line of an eval set\n\nsecond line\n")
    assert read_items(str(txt)) == [["first line of an eval set"], ["second line"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\nnot json\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        read_items(str(bad))


def test_filter_pipeline_counts_and_pickles(tmp_path):
    ev = _eval_file(tmp_path, "ev.jsonl", [{"q": WIKI[7]["text"].split("\n")[0]}])
    spec = doc_filters.make_spec(lang="en", quality_filters="gopher", decontaminate=[ev])
    assert pickle.loads(pickle.dumps(spec)) == spec  # sent to worker processes
    f = doc_filters.pipeline(spec)
    assert doc_filters.pipeline(spec) is f  # built once per process
    r1, r2 = f.new_report(), f.new_report()
    assert f.apply(WIKI[0]["text"], r1) == WIKI[0]["text"]
    assert f.apply("\n".join(GUWEN[0]["paragraphs"]), r1) is None  # not --lang
    assert f.apply("Too short to be a page of text, really.", r2) is None  # gopher min words
    assert f.apply(WIKI[7]["text"], r2) is None  # quotes the eval set
    r1.merge(r2)
    out = r1.as_dict(spec)
    assert out["documents_in"] == 4 and out["documents_out"] == 1
    assert out["languages"] == {"en": 3, "zh": 1} and out["language_dropped"] == {"zh": 1}
    assert out["quality_dropped"] == {"gopher_quality.min_doc_words": 1}
    assert out["decontamination"]["sets"]["ev.jsonl"] == {"items": 1, "items_too_short": 0,
                                                           "documents_matched": 1, "items_matched": 1}
    assert doc_filters.make_spec() is None
    with pytest.raises(UserError, match="--quality-config was given without --quality"):
        doc_filters.make_spec(quality_config="{}")
    with pytest.raises(UserError, match="--decontaminate-ngram=0"):
        doc_filters.make_spec(decontaminate=[ev], decontaminate_ngram=0)


def test_language_min_score():
    """'Tokyo 2020' is English to the model, but with probability ~0.17: below --lang-min-score."""
    lang, p = langid.detect("Tokyo 2020")
    assert lang == "en" and p < 0.65
    spec = doc_filters.make_spec(lang="en")
    f = doc_filters.pipeline(spec)
    r = f.new_report()
    assert f.apply("Tokyo 2020", r) is None and f.apply(WIKI[0]["text"], r) == WIKI[0]["text"]
    assert r.as_dict(spec)["language_low_score"] == 1
    low = doc_filters.make_spec(lang="en", lang_min_score=0.1)
    r = doc_filters.pipeline(low).new_report()
    assert doc_filters.pipeline(low).apply("Tokyo 2020", r) == "Tokyo 2020"
    with pytest.raises(UserError, match="--lang-min-score=1.5"):
        doc_filters.make_spec(lang="en", lang_min_score=1.5)
