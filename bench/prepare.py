"""Throughput of `prepare` against bare `tokenizers` encode_batch on the same text, in the same run.

    .venv/bin/python bench/prepare.py [--input PATH ...] [--tokenizer DIR] [--workers 2] [--repeat 2]

The baseline is the library alone: the documents already decoded in memory, one
``Tokenizer.encode_batch`` call (Rust, all cores via rayon) — and, where the installed version has it,
``encode_batch_fast`` (no offsets). ``prepare`` does everything on top: reads the files, decodes UTF-8,
cleans, hashes for exact dedup, splits, tokenizes in ``--workers`` processes and writes checksummed
shards. The ratio is prepare MB/s ÷ baseline MB/s (higher is better; 1.0 = as fast as the bare call).
The best of ``--repeat`` runs is kept for each side, which damps noise from other jobs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_INPUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "english_corpus"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", default=None, help="default: ../shared/data/english_corpus/*/*.txt")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train an 8k BPE on the input)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dedup", default="exact", choices=["exact", "near", "none"])
    ap.add_argument("--txt-mode", default="file")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--include", default=None, help="file-name patterns inside input dirs, e.g. '*.py'")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lmforge.data.prepare import prepare
    from lmforge.data.sources import iter_documents
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    inputs = args.input or [str(DEFAULT_INPUT / "*" / "*.txt")]
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        if args.tokenizer is None:
            print("training an 8k tokenizer on the input ...", file=sys.stderr)
            train_tokenizer(inputs, 8192, work / "tok", text_field=args.text_field, txt_mode=args.txt_mode,
                            max_bytes=20_000_000, progress=False, include=args.include)
            tok_dir = work / "tok"
        else:
            tok_dir = Path(args.tokenizer)
        tok = load_tokenizer(tok_dir)
        docs = [d for d in iter_documents(inputs, text_field=args.text_field, txt_mode=args.txt_mode,
                                              include=args.include) if d.strip()]
        nbytes = sum(len(d.encode("utf-8", errors="replace")) for d in docs)
        backend = tok.backend

        def best(fn) -> float:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        t_bare = best(lambda: backend.encode_batch(docs, add_special_tokens=False))
        t_fast = best(lambda: backend.encode_batch_fast(docs, add_special_tokens=False)) \
            if hasattr(backend, "encode_batch_fast") else None
        docs.clear()  # free the memory before prepare runs

        def run_prepare():
            out = work / "out"
            return prepare(inputs, tok_dir, out, workers=args.workers, dedup=args.dedup, txt_mode=args.txt_mode,
                           text_field=args.text_field, min_chars=0, overwrite=True, progress=False,
                           include=args.include)

        t_prep = best(run_prepare)
        mb = nbytes / 1e6
        result = {
            "inputs": inputs, "mb": round(mb, 2), "cpus": os.cpu_count(), "workers": args.workers,
            "dedup": args.dedup, "bare_encode_batch_mb_s": round(mb / t_bare, 3),
            "bare_encode_batch_fast_mb_s": round(mb / t_fast, 3) if t_fast else None,
            "prepare_mb_s": round(mb / t_prep, 3),
            "ratio_vs_encode_batch": round(t_bare / t_prep, 3),
            "ratio_vs_encode_batch_fast": round(t_fast / t_prep, 3) if t_fast else None,
        }
        if args.json:
            print(json.dumps(result))
        else:
            fast = (f", encode_batch_fast {result['bare_encode_batch_fast_mb_s']:.2f} MB/s "
                    f"(ratio {result['ratio_vs_encode_batch_fast']:.2f})") if t_fast else ""
            print(f"{mb:.1f} MB, {args.workers} workers, dedup={args.dedup}: prepare {result['prepare_mb_s']:.2f} MB/s"
                  f" vs bare encode_batch {result['bare_encode_batch_mb_s']:.2f} MB/s -> ratio "
                  f"{result['ratio_vs_encode_batch']:.2f}{fast}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
