"""Throughput of `prepare` against bare `tokenizers` encode_batch, or of its engines against each other.

    .venv/bin/python bench/prepare.py [--input PATH ...] [--tokenizer DIR] [--workers 2] [--repeat 2]
    .venv/bin/python bench/prepare.py --engines local,ray --workers 2 --sizes 8,16,32

Engines mode (``--engines``): for each input size (MB of files taken in sorted order from the inputs),
each engine runs ``prepare`` with ``--workers`` in a fresh child process while the parent samples the
resident memory of the child's whole process tree (driver + pool or Ray processes) every 0.1 s. It
prints MB/s per engine, the ratio ray ÷ local, and the peak memory per size (flat = memory does not
grow with the input), and the driver's own CPU seconds: MB ÷ driver CPU s is about the input rate at
which the one driver (dedup, split, shard writing, collecting results) would saturate however many
workers there are. The Ray cluster is started before the clock starts (``ray_init_s`` is reported
apart): on a real cluster it is already running.

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


def _files_up_to(inputs: list[str], mb: float) -> list[str]:
    from lmforge.sources import resolve_inputs

    out, total = [], 0
    for p in resolve_inputs(inputs):
        if total >= mb * 1e6:
            break
        out.append(p)
        total += os.path.getsize(p)
    return out


def _child(spec: str) -> int:
    """One timed prepare run (in its own process, so its memory is measured alone)."""
    cfg = json.loads(spec)
    from lmforge.data.prepare import prepare

    init = 0.0
    if cfg["engine"] == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=cfg["workers"], include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - t0
    import resource

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    r = prepare(cfg["inputs"], cfg["tokenizer"], cfg["out"], workers=cfg["workers"], engine=cfg["engine"],
                dedup=cfg["dedup"], txt_mode=cfg["txt_mode"], min_chars=0, overwrite=True, progress=False)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)  # the driver alone (pool processes are children)
    driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"seconds": seconds, "ray_init_s": init, "mb": r["bytes_read"] / 1e6,
                      "tokens": r["tokens"], "driver_cpu_s": driver_cpu}))
    return 0


def _sample_tree(proc) -> tuple[int, int]:
    """(driver RSS, RSS of the driver and all its descendants) in bytes."""
    import psutil

    driver = total = 0
    try:
        root = psutil.Process(proc.pid)
        driver = root.memory_info().rss
        total = driver
        for p in root.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return driver, total


def engines_mode(args, inputs: list[str], tok_dir: Path, work: Path) -> int:
    import subprocess

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    rows = []
    for size in [float(x) for x in args.sizes.split(",")]:
        files = _files_up_to(inputs, size)
        for engine in engines:
            best = None
            for _ in range(args.repeat):
                spec = json.dumps({"engine": engine, "workers": args.workers, "inputs": files,
                                   "dedup": args.dedup,
                                   "tokenizer": str(tok_dir), "out": str(work / f"out-{engine}"),
                                   "txt_mode": args.txt_mode})
                proc = subprocess.Popen([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE,
                                        text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
                peak = peak_driver = 0
                while proc.poll() is None:
                    driver, tree = _sample_tree(proc)
                    peak, peak_driver = max(peak, tree), max(peak_driver, driver)
                    time.sleep(0.1)
                out = proc.stdout.read()
                if proc.returncode != 0:
                    print(f"{engine} run failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
                r = json.loads(out.strip().splitlines()[-1])
                r["peak_tree_mb"], r["peak_driver_mb"] = peak / 1e6, peak_driver / 1e6
                if best is None or r["seconds"] < best["seconds"]:
                    best = r
            best.update(engine=engine, size_mb=round(best["mb"], 1), mb_s=best["mb"] / best["seconds"])
            rows.append(best)
            print(f"{best['size_mb']:>6.1f} MB  {engine:<5} {best['mb_s']:6.2f} MB/s  "
                  f"{best['seconds']:6.1f} s  driver CPU {best['driver_cpu_s']:5.1f} s "
                  f"(ceiling ~{best['mb'] / max(best['driver_cpu_s'], 1e-9):.1f} MB/s)  "
                  f"peak {best['peak_tree_mb']:7.0f} MB (process tree), driver {best['peak_driver_mb']:5.0f} MB"
                  + (f"  ray init {best['ray_init_s']:.1f} s" if engine == "ray" else ""), file=sys.stderr)
    by = {(r["engine"], r["size_mb"]): r for r in rows}
    summary = []
    for size in sorted({r["size_mb"] for r in rows}):
        entry = {"size_mb": size, **{f"{e}_mb_s": round(by[(e, size)]["mb_s"], 3) for e in engines},
                 **{f"{e}_peak_mb": round(by[(e, size)]["peak_tree_mb"]) for e in engines},
                 **{f"{e}_driver_peak_mb": round(by[(e, size)]["peak_driver_mb"]) for e in engines}}
        if {"local", "ray"} <= set(engines):
            entry["ray_over_local"] = round(by[("ray", size)]["mb_s"] / by[("local", size)]["mb_s"], 3)
        summary.append(entry)
    result = {"workers": args.workers, "dedup": args.dedup, "cpus": os.cpu_count(), "rows": summary}
    if args.json:
        print(json.dumps(result))
    else:
        for e in summary:
            print(json.dumps(e))
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        return _child(sys.argv[2])
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
    ap.add_argument("--engines", default=None, help="compare engines instead, e.g. local,ray")
    ap.add_argument("--sizes", default="8,16,32", help="engines mode: input sizes in MB")
    args = ap.parse_args()

    from lmforge.data.prepare import prepare
    from lmforge.sources import iter_documents
    from lmforge.tokenizer.core import load_tokenizer
    from lmforge.tokenizer.train import train_tokenizer

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
        if args.engines:
            return engines_mode(args, inputs, tok_dir, work)
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
