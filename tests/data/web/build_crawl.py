"""Build a small, realistic web crawl from the vendored real texts (tests/data/web, tests/data/...).

Real article text (Wikipedia leads, 古文觀止 pieces) is wrapped in site boilerplate — navigation menus,
cookie banners, sidebars, share bars, footers with privacy / terms links — and written as a gzipped WARC
(with the request, warcinfo, image and robots.txt records a crawler writes), a WET file and loose .html
pages. Among the pages: exact duplicates (one article on two sites), a near duplicate (an updated copy),
mixed-language pages, low-quality pages (repeated spam, a placeholder page, a page with code, a stub, a
link list), and pages quoting an evaluation set (a SQuAD paragraph, a Tang poem).

``build_crawl(out_dir)`` writes ``crawl.warc.gz``, ``crawl.wet.gz``, ``pages/*.html``,
``eval_squad.jsonl`` and ``eval_tangshi.json`` and returns the page list (what each page is) so tests
can check the pipeline against it. ``python tests/data/web/build_crawl.py OUT_DIR`` writes the same files
(the README's web-crawl example uses them).
"""

from __future__ import annotations

import html
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_DATA = HERE.parent

COOKIE_EN = ("We use cookies to give you the best experience on our website. By continuing to browse you agree "
             "to our use of cookies. Read our cookie policy.")
COOKIE_ZH = "本网站使用Cookie来改善您的浏览体验。继续浏览即表示您同意我们使用Cookie。"
SITES = {
    "a": {"name": "The Daily Reference", "nav": ["Home", "World", "Science", "Culture", "Sports", "About us",
                                                 "Contact", "Subscribe"],
          "cookie": COOKIE_EN, "side": "Most read", "footer": "© 2024 The Daily Reference. All rights reserved.",
          "legal": ["Privacy policy", "Terms of use", "Cookie settings"], "lang": "en"},
    "b": {"name": "Open Knowledge Blog", "nav": ["Blog", "Archive", "Topics", "Newsletter", "Log in", "Sign up"],
          "cookie": COOKIE_EN, "side": "Related posts", "footer": "Open Knowledge Blog, powered by WordPress.",
          "legal": ["Privacy policy", "Terms of use", "Imprint"], "lang": "en"},
    "c": {"name": "古文网", "nav": ["首页", "古文", "诗词", "作者", "名句", "登录", "注册", "English"],
          "cookie": COOKIE_ZH, "side": "热门文章", "footer": "版权所有 © 2024 古文网 京ICP备12345678号",
          "legal": ["隐私政策", "使用条款", "联系我们"], "lang": "zh"},
}


def load_texts() -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(wiki articles, guwen pieces, squad paragraphs, tang poems) from the vendored files."""
    wiki = [json.loads(line) for line in (HERE / "wiki_en.jsonl").read_text(encoding="utf-8").splitlines()]
    guwen = [json.loads(line) for line in (HERE / "guwen_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    squad = json.loads((TEST_DATA / "qa_en_squad_v1.1_dev/squad_v1.1_dev_reconstructed.json").read_text())
    paragraphs = squad["data"][0]["paragraphs"]
    poems = json.loads((TEST_DATA / "chinese_poetry/classics/tangshi_300.json").read_text(encoding="utf-8"))
    return wiki, guwen, paragraphs, poems


def page_html(site: str, title: str, paragraphs: list[str], related: list[str], h1: bool = True) -> str:
    s = SITES[site]
    esc = html.escape
    nav = "".join(f'<li><a href="/{i}">{esc(x)}</a></li>' for i, x in enumerate(s["nav"]))
    side = "".join(f'<li><a href="/r/{i}">{esc(x)}</a></li>' for i, x in enumerate(related))
    legal = " | ".join(f'<a href="/legal/{i}">{esc(x)}</a>' for i, x in enumerate(s["legal"]))
    body = "\n".join(f"<p>{esc(p)}</p>" for p in paragraphs)
    share = "Share: Facebook Twitter E-mail" if s["lang"] == "en" else "分享到：微博 微信 QQ空间"
    return f"""<!DOCTYPE html>
<html lang="{s['lang']}"><head><meta charset="utf-8"><title>{esc(title)} - {esc(s['name'])}</title>
<script>window.dataLayer = window.dataLayer || []; function gtag(){{dataLayer.push(arguments);}}</script>
<style>body {{ font-family: sans-serif; }}</style></head>
<body>
<div id="cookie-banner" class="cookie-consent"><p>{esc(s['cookie'])}</p><button>OK</button></div>
<header><div class="logo">{esc(s['name'])}</div><nav class="menu"><ul>{nav}</ul></nav></header>
<main><article>
{f"<h1>{esc(title)}</h1>" if h1 else ""}
{body}
</article>
<div class="share">{share}</div></main>
<aside class="sidebar"><h3>{esc(s['side'])}</h3><ul>{side}</ul></aside>
<footer><p>{esc(s['footer'])}</p><p>{legal}</p></footer>
</body></html>
"""


def _split_en(text: str) -> list[str]:
    return [p for p in text.split("\n") if p.strip()]


def pages() -> list[dict]:
    """Every page of the crawl: url, site, title, paragraphs, kind (what the pipeline should do with it)."""
    wiki, guwen, squad, poems = load_texts()
    titles_en = [w["title"] for w in wiki]
    titles_zh = [g["title"] for g in guwen]
    out: list[dict] = []

    def add(kind: str, site: str, url: str, title: str, paragraphs: list[str], **extra) -> None:
        related = titles_zh[:5] if SITES[site]["lang"] == "zh" else titles_en[:5]
        out.append({"kind": kind, "site": site, "url": url, "title": title, "paragraphs": paragraphs,
                    "html": page_html(site, title, paragraphs, related), **extra})

    for i, w in enumerate(wiki[:8]):  # clean English articles
        add("article_en", "ab"[i % 2], f"https://{'ab'[i % 2]}.example/wiki/{i}", w["title"], _split_en(w["text"]))
    # the same article on the other site: an exact duplicate once the boilerplate is gone
    add("exact_dup_en", "b", "https://b.example/mirror/0", wiki[0]["title"], _split_en(wiki[0]["text"]))
    # an updated copy of article 2: one sentence added -> a near duplicate
    add("near_dup_en", "a", "https://a.example/wiki/2?rev=2", wiki[2]["title"],
        _split_en(wiki[2]["text"]) + ["This article was last updated in March 2024 to correct a typo."])
    for i, g in enumerate(guwen[:6]):  # clean Chinese pieces
        add("article_zh", "c", f"https://c.example/guwen/{i}", g["title"], g["paragraphs"])
    add("exact_dup_zh", "c", "https://c.example/mirror/0", guwen[0]["title"], guwen[0]["paragraphs"])
    # mixed language: an English article with a Chinese paragraph; a Chinese piece with an English note
    quote = guwen[7]["paragraphs"][0].split("。")[0] + "。"
    add("mixed_en", "b", "https://b.example/wiki/8", wiki[8]["title"],
        _split_en(wiki[8]["text"]) + [f"The program notes open with a line of classical Chinese: {quote}"])
    add("mixed_zh", "c", "https://c.example/guwen/6", guwen[6]["title"],
        guwen[6]["paragraphs"] + ["English translation: see the archive for a full translation of this piece."])
    # low quality
    cities = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Athens"]
    stuffing = " ".join(f"Cheap flights to {c} and cheap hotels in {c} with the best deals." for c in cities)
    add("spam_en", "a", "https://a.example/deals", "Best deals", [_split_en(wiki[9]["text"])[0], stuffing])
    add("lorem_en", "b", "https://b.example/draft", wiki[5]["title"], _split_en(wiki[5]["text"]) + [
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore."])
    add("code_en", "a", "https://a.example/widget", wiki[3]["title"], _split_en(wiki[3]["text"]) + [
        "To embed this article, call embed({ id: 3, theme: 'light' }) after the page has loaded."])
    add("stub_en", "a", "https://a.example/404", "Page not found",
        ["Sorry, the page you are looking for does not exist."])
    line = poems[1]["paragraphs"][0]
    add("spam_zh", "c", "https://c.example/spam", "名句", [line] * 12)
    # pages quoting an evaluation set
    add("quotes_squad", "b", "https://b.example/superbowl", "Notes on Super Bowl 50",
        [wiki[6]["text"].split("\n")[0], "From a summary we read this week:", squad[0]["context"],
         "We will come back to this game in a later post about the history of the championship."])
    poem = poems[2]
    add("quotes_poem", "c", "https://c.example/guwen/7", guwen[7]["title"],
        guwen[7]["paragraphs"] + ["附：" + poem["title"] + "。" + "".join(poem["paragraphs"])])
    return out


def eval_sets(out: Path) -> tuple[Path, Path]:
    """SQuAD questions with their paragraphs (jsonl) and the vendored Tang poems (json)."""
    _, _, squad, _ = load_texts()
    p = out / "eval_squad.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": qa["question"], "context": para["context"],
                                 "answers": [a["text"] for a in qa["answers"]]}) + "\n"
                     for para in squad for qa in para["qas"])
    q = out / "eval_tangshi.json"
    q.write_bytes((TEST_DATA / "chinese_poetry/classics/tangshi_300.json").read_bytes())
    return p, q


def write_warc(path: Path, items: list[dict]) -> None:
    """A gzipped WARC as a crawler writes it: warcinfo, then request + response per page, plus an image
    and a robots.txt response."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "lmforge-test-crawler"}))
        for i, p in enumerate(items):
            req = StatusAndHeaders("GET / HTTP/1.1", [("Host", p["url"].split("/")[2])], is_http_request=True)
            w.write_record(w.create_warc_record(p["url"], "request", http_headers=req))
            payload = p["html"].encode("utf-8")
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                  ("Content-Length", str(len(payload)))], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(p["url"], "response", payload=io.BytesIO(payload),
                                                http_headers=headers))
            if i == 0:
                png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
                h = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.1")
                w.write_record(w.create_warc_record("https://a.example/logo.png", "response",
                                                    payload=io.BytesIO(png), http_headers=h))
                robots = b"User-agent: *\nDisallow: /admin\n"
                h = StatusAndHeaders("200 OK", [("Content-Type", "application/octet-stream")], protocol="HTTP/1.1")
                w.write_record(w.create_warc_record("https://a.example/robots.txt", "response",
                                                    payload=io.BytesIO(robots), http_headers=h))


def write_wet(path: Path, docs: list[tuple[str, str]]) -> None:
    """A gzipped WET file: warcinfo + one ``conversion`` record of plain text per page."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "lmforge-test-crawler"}))
        for url, text in docs:
            w.write_record(w.create_warc_record(url, "conversion", payload=io.BytesIO(text.encode("utf-8")),
                                                warc_headers_dict={"Content-Type": "text/plain"}))


def build_crawl(out: Path) -> dict:
    """Write the crawl under ``out``; returns {"warc": [...pages], "wet": [...], "html": [...], paths}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_pages = pages()
    html_kinds = {"article_en": 1, "article_zh": 1}  # one page of each kind is a loose .html file instead
    in_html, in_warc = [], []
    for p in all_pages:
        if html_kinds.get(p["kind"], 0) and p["url"].endswith(("/wiki/7", "/guwen/5")):
            in_html.append(p)
        else:
            in_warc.append(p)
    write_warc(out / "crawl.warc.gz", in_warc)
    (out / "pages").mkdir(exist_ok=True)
    for p in in_html:
        (out / "pages" / (p["url"].rsplit("/", 1)[-1] + "_" + p["site"] + ".html")).write_text(p["html"],
                                                                                             encoding="utf-8")
    wiki, guwen, _, _ = load_texts()
    wet = [("https://d.example/wet/0", wiki[9]["text"]),  # WET: text already extracted
           ("https://d.example/wet/1", "\n".join(guwen[7]["paragraphs"][1:]))]
    write_wet(out / "crawl.wet.gz", wet)
    squad_path, tang_path = eval_sets(out)
    return {"warc": in_warc, "html": in_html, "wet": wet, "eval_squad": squad_path, "eval_tangshi": tang_path}


def build_demo_crawl(out: Path, shared: Path) -> dict:
    """The README's larger crawl from the full ``../shared/data`` sets: 30 Wikipedia leads and the 300 C4
    pages (real web text) as English articles, all 222 古文觀止 pieces as Chinese ones, with mirrored
    (exact) and updated (near) copies every few pages, low-quality pages, and pages quoting SQuAD dev
    contexts and Tang poems; the evaluation sets are the full SQuAD v1.1 dev set and 唐詩三百首."""
    sys.path.insert(0, str(HERE))
    from make_web_slices import lead

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wiki_lines = (shared / "english_corpus/llamafactory_pretrain_demo/wiki_demo.txt").read_text(encoding="utf-8")
    en = [(t.split(" is ", 1)[0].split(" (", 1)[0][:60], lead(t).split("\n")) for t in wiki_lines.splitlines()]
    for line in (shared / "english_corpus/llamafactory_pretrain_demo/c4_demo.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        en.append((f"Post {len(en)}", [p for p in text.split("\n") if p.strip()]))
    guwen = json.loads((shared / "chinese_poetry/classics/guwenguanzhi.json").read_text(encoding="utf-8"))
    zh = [(c["chapter"], c["paragraphs"]) for vol in guwen["content"] for c in vol["content"]]
    squad = json.loads((shared / "qa_en_squad_v1.1_dev/squad_v1.1_dev_reconstructed.json").read_text())
    contexts = [p for a in squad["data"] for p in a["paragraphs"]]
    poems = json.loads((shared / "chinese_poetry/classics/tangshi_300.json").read_text(encoding="utf-8"))
    items: list[dict] = []

    def add(kind, site, url, title, paragraphs):
        related = [t for t, _ in (zh if SITES[site]["lang"] == "zh" else en)[:5]]
        h1 = not title.startswith("Post ")  # C4 pages have no title of their own: no <h1>
        items.append({"kind": kind, "url": url, "html": page_html(site, title, paragraphs, related, h1)})

    for i, (title, paras) in enumerate(en):
        add("article_en", "ab"[i % 2], f"https://{'ab'[i % 2]}.example/en/{i}", title, paras)
        if i % 7 == 3:
            add("exact_dup_en", "ba"[i % 2], f"https://{'ba'[i % 2]}.example/mirror/{i}", title, paras)
        if i % 11 == 5:
            add("near_dup_en", "ab"[i % 2], f"https://{'ab'[i % 2]}.example/en/{i}?rev=2", title,
                paras + ["This page was last updated in March 2024 to correct a typo."])
    for i, (title, paras) in enumerate(zh):
        add("article_zh", "c", f"https://c.example/zh/{i}", title, paras)
        if i % 9 == 4:
            add("exact_dup_zh", "c", f"https://c.example/mirror/{i}", title, paras)
    cities = ["Paris", "London", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Athens"]
    for k in range(5):
        stuffing = " ".join(f"Cheap flights to {c} and cheap hotels in {c} with the best deals."
                            for c in cities[k:] + cities[:k])
        add("spam_en", "a", f"https://a.example/deals/{k}", "Best deals", [en[k][1][0], stuffing])
        add("stub_en", "a", f"https://a.example/404/{k}", "Page not found",
            ["Sorry, the page you are looking for does not exist."])
        add("spam_zh", "c", f"https://c.example/spam/{k}", "名句", [poems[k]["paragraphs"][0]] * 12)
    for k in range(3):
        add("lorem_en", "b", f"https://b.example/draft/{k}", en[40 + k][0], en[40 + k][1] + [
            "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore."])
        add("code_en", "a", f"https://a.example/widget/{k}", en[50 + k][0], en[50 + k][1] + [
            "To embed this article, call embed({ id: 3, theme: 'light' }) after the page has loaded."])
    for k in range(5):
        ctx = contexts[k * 400]["context"]
        add("quotes_squad", "b", f"https://b.example/notes/{k}", "Reading notes",
            [en[60 + k][1][0], "From a summary we read this week:", ctx,
             "We will come back to this in a later post."])
        poem = poems[10 + k * 50]
        add("quotes_poem", "c", f"https://c.example/notes/{k}", zh[100 + k][0],
            zh[100 + k][1] + ["附：" + poem["title"] + "。" + "".join(poem["paragraphs"])])
    write_warc(out / "crawl.warc.gz", items)
    p = out / "eval_squad.jsonl"
    with open(p, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": qa["question"], "context": para["context"],
                                 "answers": [a["text"] for a in qa["answers"]]}) + "\n"
                     for para in contexts for qa in para["qas"])
    (out / "eval_tangshi.json").write_bytes((shared / "chinese_poetry/classics/tangshi_300.json").read_bytes())
    return {"warc": items}


if __name__ == "__main__":
    if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--shared"):
        sys.exit("usage: python tests/data/web/build_crawl.py OUT_DIR [--shared ../shared/data]")
    if len(sys.argv) == 4:
        built = build_demo_crawl(Path(sys.argv[1]), Path(sys.argv[3]))
        kinds: dict[str, int] = {}
        for item in built["warc"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
        print(f"wrote {len(built['warc'])} WARC pages to {sys.argv[1]}: {kinds}")
    else:
        built = build_crawl(Path(sys.argv[1]))
        print(f"wrote {len(built['warc'])} WARC pages, {len(built['html'])} HTML files, {len(built['wet'])} WET "
              f"records to {sys.argv[1]}")
