"""lmforge's near-dedup (numpy MinHash + banded LSH, ``lmforge/data/clean.py``) against datasketch's
``MinHash`` + ``MinHashLSH`` on the same documents: time and which documents each flags.

    .venv/bin/python bench/near_dedup.py [--docs 3000] [--threshold 0.8]

Documents: paragraphs (lines over 400 characters) of real text (``../shared/data/english_corpus/wikitext2_*``), plus for every
tenth one a lightly edited copy (a few words changed) and for every twentieth one a heavily edited
copy (half of it rewritten): the first kind should be flagged, the second not. Both sides use character
5-grams of the normalized text and 128 permutations, process the documents in order and keep a document
unless it is a near duplicate of one kept before (query, then insert), as ``prepare`` does.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "english_corpus"


def documents(n: int, seed: int = 0) -> tuple[list[str], set[int], set[int]]:
    paras: list[str] = []
    for f in [*sorted(DATA.glob("wikitext2_*/*.txt")), *sorted(DATA.glob("wikitext2_*/*.raw"))]:
        paras += [p.strip() for p in f.read_text(encoding="utf-8").splitlines() if len(p.strip()) > 400]
    paras = list(dict.fromkeys(paras))[:n]
    rng = random.Random(seed)
    docs, light, heavy = [], set(), set()
    for i, p in enumerate(paras):
        docs.append(p)
        words = p.split()
        if i % 10 == 0:
            w = list(words)
            for j in rng.sample(range(len(w)), max(1, len(w) // 50)):
                w[j] = w[j][::-1]
            light.add(len(docs))
            docs.append(" ".join(w))
        if i % 20 == 5:
            w = list(words)
            for j in rng.sample(range(len(w)), len(w) // 2):
                w[j] = "x" + w[j][::-1]
            heavy.add(len(docs))
            docs.append(" ".join(w))
    return docs, light, heavy


def run_lmforge(docs: list[str], threshold: float) -> tuple[set[int], float]:
    from lmforge.data import clean

    t0 = time.perf_counter()
    mh, lsh, dup = clean.MinHasher(), clean.NearDedup(threshold=threshold), set()
    for i, d in enumerate(docs):
        if lsh.seen(mh.signature(clean.normalize(d))):
            dup.add(i)
    return dup, time.perf_counter() - t0


def run_datasketch(docs: list[str], threshold: float) -> tuple[set[int], float]:
    from datasketch import MinHash, MinHashLSH

    from lmforge.data import clean

    t0 = time.perf_counter()
    lsh, dup = MinHashLSH(threshold=threshold, num_perm=128), set()
    for i, d in enumerate(docs):
        norm = clean.normalize(d)
        m = MinHash(num_perm=128)
        m.update_batch([norm[k:k + 5].encode("utf-8") for k in range(max(len(norm) - 4, 1))])
        if lsh.query(m):
            dup.add(i)
        else:
            lsh.insert(str(i), m)
    return dup, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=3000)
    ap.add_argument("--threshold", type=float, default=0.8)
    args = ap.parse_args()
    docs, light, heavy = documents(args.docs)
    ours, t_ours = run_lmforge(docs, args.threshold)
    theirs, t_theirs = run_datasketch(docs, args.threshold)
    mb = sum(len(d) for d in docs) / 1e6
    result = {
        "documents": len(docs), "mb": round(mb, 2), "light_edits": len(light), "heavy_edits": len(heavy),
        "lmforge": {"flagged": len(ours), "light_found": len(ours & light), "heavy_flagged": len(ours & heavy),
                    "seconds": round(t_ours, 2), "docs_per_s": round(len(docs) / t_ours)},
        "datasketch": {"flagged": len(theirs), "light_found": len(theirs & light),
                       "heavy_flagged": len(theirs & heavy), "seconds": round(t_theirs, 2),
                       "docs_per_s": round(len(docs) / t_theirs)},
        "agree": len(ours & theirs), "only_lmforge": len(ours - theirs), "only_datasketch": len(theirs - ours),
        "speed_ratio_lmforge_over_datasketch": round(t_theirs / t_ours, 2),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
