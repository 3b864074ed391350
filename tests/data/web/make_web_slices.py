"""Rebuild the web-test slices from ../shared/data: `python tests/data/web/make_web_slices.py [SHARED_DATA]`.

- wiki_en.jsonl: the lead of the first 10 articles of LLaMA-Factory's wiki_demo.txt (Wikipedia): the
  paragraphs before the first run-together section heading, at most 3,000 characters;
- guwen_zh.jsonl: the first 8 pieces of 古文觀止 (chinese-poetry's guwenguanzhi.json), title + paragraphs.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")


def lead(article: str, limit: int = 3000) -> str:
    """The article's lead paragraphs ("\n"-separated): the dump glues paragraphs (".The") and headings
    ("tradition.HistoryThe") to the text; paragraphs are split at the first, the lead ends at a heading."""
    heading = re.search(r"[a-z][A-Z][a-z]", article[200:])
    text = article[: 200 + heading.start() + 1] if heading else article
    paragraphs = re.split(r"(?<=[.!?])(?=[A-Z])", text)
    out: list[str] = []
    for p in paragraphs:
        if not p.rstrip().endswith((".", "!", "?")) or sum(map(len, out)) + len(p) > limit:
            break
        out.append(p.strip())
    return "\n".join(out)


def main() -> None:
    lines = (SHARED / "english_corpus/llamafactory_pretrain_demo/wiki_demo.txt").read_text(encoding="utf-8")
    with open(HERE / "wiki_en.jsonl", "w", encoding="utf-8") as f:
        for article in lines.splitlines()[:10]:
            text = lead(article)
            title = text.split(" is ", 1)[0].split(" (", 1)[0][:60]
            f.write(json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n")
    guwen = json.loads((SHARED / "chinese_poetry/classics/guwenguanzhi.json").read_text(encoding="utf-8"))
    pieces = [c for vol in guwen["content"] for c in vol["content"]][:8]
    with open(HERE / "guwen_zh.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"title": c["chapter"], "paragraphs": c["paragraphs"]}, ensure_ascii=False) + "\n"
                     for c in pieces)


if __name__ == "__main__":
    main()
