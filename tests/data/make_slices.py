"""Rebuild the vendored slices in this folder from the full sets in ../shared/data (beside the checkout).

    python tests/data/make_slices.py [SHARED_DATA_DIR]

Only sets whose licences allow redistribution are sliced (see SOURCE.md); the cuts are deterministic
(first N records, or every k-th record), so re-running gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data"


def write(rel: str, text: str) -> None:
    p = HERE / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def read(rel: str) -> str:
    return (SHARED / rel).read_text(encoding="utf-8")


def lines_every(rel: str, n: int, skip_header: bool = False) -> list[str]:
    lines = read(rel).splitlines()
    head, body = (lines[:1], lines[1:]) if skip_header else ([], lines)
    step = max(1, len(body) // n)
    return head + body[::step][:n]


def json_head(rel: str, n: int) -> list:
    return json.loads(read(rel))[:n]


def dump(obj) -> str:
    """JSON with one record per line (lists) — compact, yet readable in a diff."""
    if isinstance(obj, list):
        return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in obj) + "\n]\n"
    return json.dumps(obj, ensure_ascii=False) + "\n"


def main() -> None:
    # English prose (public domain): the first ~300 kB of Tiny Shakespeare, cut at a blank line.
    text = read("tinyshakespeare/input.txt")
    write("tinyshakespeare/input.txt", text[: text.index("\n\n", 300_000) + 2])
    # Classical Chinese (MIT; texts public domain).
    write("chinese_poetry/classics/lunyu.json", read("chinese_poetry/classics/lunyu.json"))
    write("chinese_poetry/classics/tangshi_300.json", dump(json_head("chinese_poetry/classics/tangshi_300.json", 120)))
    write("chinese_poetry/songci/ci.song.0.json", dump(json_head("chinese_poetry/songci/ci.song.0.json", 250)))
    write("chinese_poetry/quantangshi/poet.tang.0.json",
          dump(json_head("chinese_poetry/quantangshi/poet.tang.0.json", 250)))
    # US presidential inaugural addresses (public domain): the first 12 files; C4 demo (ODC-BY): 25 records.
    for f in sorted((SHARED / "english_corpus" / "nltk_inaugural").glob("*.txt"))[:12]:
        write(f"english_corpus/nltk_inaugural/{f.name}", f.read_text(encoding="utf-8"))
    c4 = read("english_corpus/llamafactory_pretrain_demo/c4_demo.jsonl").splitlines()[:25]
    write("english_corpus/llamafactory_pretrain_demo/c4_demo.jsonl", "\n".join(c4) + "\n")
    # QA: SQuAD v1.1 dev (CC BY-SA 4.0), the first 12 paragraphs of the first article; NQ-Open dev (CC BY-SA 3.0), every k-th of 300.
    squad = json.loads(read("qa_en_squad_v1.1_dev/squad_v1.1_dev_reconstructed.json"))
    squad["data"] = [{**squad["data"][0], "paragraphs": squad["data"][0]["paragraphs"][:12]}]
    write("qa_en_squad_v1.1_dev/squad_v1.1_dev_reconstructed.json", dump(squad))
    write("qa_en_nq_open/NQ-open.dev.jsonl", "\n".join(lines_every("qa_en_nq_open/NQ-open.dev.jsonl", 300)) + "\n")
    # Summarization: SciTLDR-A test (Apache-2.0), the first 40 records.
    sci = read("summarization_en_scitldr/test.jsonl").splitlines()[:40]
    write("summarization_en_scitldr/test.jsonl", "\n".join(sci) + "\n")
    # Translation: Tatoeba cmn-eng (CC BY 2.0 FR), every k-th of 600 pairs (short to long sentences).
    write("translation_en_zh_tatoeba/cmn.txt", "\n".join(lines_every("translation_en_zh_tatoeba/cmn.txt", 600)) + "\n")
    # Sentiment: Pang & Lee sentence polarity (CC BY 4.0), 300 negative + 300 positive, with its header.
    rows = read("sentiment_en_rt_polarity/rt_polarity.tsv").splitlines()
    neg = [r for r in rows[1:] if r.endswith("\t0")]
    pos = [r for r in rows[1:] if r.endswith("\t1")]
    mixed = [r for pair in zip(neg[::10][:300], pos[::10][:300]) for r in pair]
    write("sentiment_en_rt_polarity/rt_polarity.tsv", "\n".join([rows[0], *mixed]) + "\n")
    # Derived from the MIT-licensed poetry above (formats the readers must take: CSV with a header and
    # quoting, header-less TSV by column number): is a poem a Tang shi or a Song ci?
    tang = json_head("chinese_poetry/quantangshi/poet.tang.0.json", 1000)[250:550]
    song = json_head("chinese_poetry/songci/ci.song.0.json", 1000)[250:550]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "review"])
    for t, s in zip(tang, song):
        w.writerow(["tang", "".join(t["paragraphs"])])
        w.writerow(["song", "".join(s["paragraphs"])])
    write("chinese_poetry/derived/tang_or_song.csv", buf.getvalue())
    titles = [f"{t['title']}\ttang" for t in tang[:150]] + [f"{s['rhythmic']}·{s['author']}\tsong" for s in song[:150]]
    write("chinese_poetry/derived/titles.txt", "\n".join(titles[::2] + titles[1::2]) + "\n")
    # One poem line per text line (all the poems above and the Analects): Chinese plain text.
    lines = [ln for f in ("chinese_poetry/classics/lunyu.json", "chinese_poetry/quantangshi/poet.tang.0.json",
                          "chinese_poetry/songci/ci.song.0.json", "chinese_poetry/classics/tangshi_300.json")
             for rec in json.loads((HERE / f).read_text(encoding="utf-8")) for ln in rec["paragraphs"]]
    write("chinese_poetry/derived/lines.txt", "\n".join(lines) + "\n")
    # Licence files that must travel with the text.
    write("chinese_poetry/LICENSE", read("chinese_poetry/LICENSE"))
    write("summarization_en_scitldr/LICENSE", read("summarization_en_scitldr/LICENSE"))
    # Instruction data in Alpaca format, derived from the Tatoeba pairs above (CC BY 2.0 FR).
    pairs = [ln.split("\t")[:2] for ln in lines_every("translation_en_zh_tatoeba/cmn.txt", 600)]
    alpaca = [{"instruction": "把下面的句子翻译成中文。", "input": en, "output": zh} for en, zh in pairs[::2]]
    alpaca += [{"instruction": "Translate this sentence into English.", "input": zh, "output": en}
               for en, zh in pairs[1::2]]
    write("translation_en_zh_tatoeba/derived/alpaca_translate.json", dump(alpaca))


if __name__ == "__main__":
    main()
