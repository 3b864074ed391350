"""`lmforge serve` under load: 1, 4 and 16 concurrent streaming clients against one server.

    python bench/serve.py                              # the `small` preset (8M), random weights, CPU
    python bench/serve.py --model RUN/model            # a real model dir
    python bench/serve.py --preset tiny --new-tokens 32 --levels 1 4 16 --json

Starts `lmforge serve` as its own process on 127.0.0.1 (``--max-batch`` = the highest level). A first pass
serves every prompt alone (the reference texts); then ``--rounds`` rounds run every level in turn (levels
interleaved, so a busy moment on a shared machine does not land on one level only): that many client threads,
each streaming greedy chat completions (``stream: true``) from a shared list of prompts. Per level it prints
the median round's aggregate completion tokens/s (and each round's), p50/p99 time to first token (TTFT) and
p50/p99 time between streamed chunks (about one token each), pooled over the rounds. Every greedy stream's
text is compared with the same prompt served alone; the last lines give the 16-vs-1 throughput ratio (goal
>= 4x on a CPU) and how many streams matched.

With random weights (no ``--model``) the end-of-turn tokens are zeroed in the output layer so every
request runs to ``--new-tokens``: each level does the same work per request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
FALLBACK_LINES = ["The quick brown fox jumps over the lazy dog.", "你好，世界。今天天气很好。",
                  "Serving models with continuous batching.", "To be, or not to be, that is the question."]


def corpus_lines() -> list[str]:
    if SHAKESPEARE.is_file():
        return [s for s in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if len(s) > 20][:4000]
    return FALLBACK_LINES * 50


def build_model_dir(preset: str, out: Path) -> Path:
    import dataclasses

    import torch

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    (out / "corpus.txt").write_text("\n".join(corpus_lines()), encoding="utf-8")
    tok = train_tokenizer([str(out / "corpus.txt")], 2000, out / "tok", progress=False)
    cfg = dataclasses.replace(get_preset(preset), vocab_size=2048)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # no EOS / <|end|>: every request generates exactly --new-tokens
        for t in {tok.eos_id, tok.special_tokens.get("<|end|>")} - {None}:
            model.output.weight[t] = 0.0
    return save_model_dir(model, out / f"{preset}-random", tokenizer_dir=str(out / "tok"))


def start_server(model_dir: Path, max_batch: int, threads: int | None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", "0",
           "--max-batch", str(max_batch), "--max-queue", str(4 * max_batch), "--model-name", "bench"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " at http" not in line:
        proc.kill()
        raise SystemExit(f"error: lmforge serve did not start (exit {proc.wait()}); run it by hand: {' '.join(cmd)}")
    return proc, line.split(" at ")[1].split("/ ")[0]


def stream_one(client, url: str, prompt: str, new_tokens: int) -> dict:
    """One streaming chat request: its text, completion tokens, TTFT and the gaps between content chunks."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, text, tokens = [], "", 0
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            for c in ev.get("choices", []):
                piece = c["delta"].get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text += piece
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"prompt": prompt, "text": text, "tokens": tokens, "ttft": stamps[0] - t0 if stamps else None,
            "gaps": gaps}


def run_level(url: str, clients: int, prompts: list[str], new_tokens: int) -> dict:
    import httpx

    todo, lock, results = list(prompts), threading.Lock(), []

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop(0)
                res = stream_one(client, url, prompt, new_tokens)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tok_per_s": round(tokens / wall, 1), "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "token_p50_ms": pct(gaps, 50), "token_p99_ms": pct(gaps, 99), "results": results}


def merge(runs: list[dict]) -> dict:
    """One level over several rounds: the median round's throughput, latencies pooled over all rounds."""
    results = [r for run in runs for r in run["results"]]
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    return {"clients": runs[0]["clients"], "rounds": len(runs), "requests": len(results),
            "tokens": sum(r["tokens"] for r in results), "seconds": round(sum(r["seconds"] for r in runs), 2),
            "tok_per_s": statistics.median(r["tok_per_s"] for r in runs),
            "tok_per_s_rounds": [r["tok_per_s"] for r in runs],
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "token_p50_ms": pct(gaps, 50),
            "token_p99_ms": pct(gaps, 99), "results": results}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(1000 * xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model dir to serve (default: a random-weight --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    p.add_argument("--new-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--requests", type=int, default=16, help="requests per level (at least 2 per client)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all levels (median throughput)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server (lmforge serve --threads)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    lines = corpus_lines()
    n_prompts = max(args.requests, 2 * max(args.levels))
    prompts = [lines[(i * 97) % len(lines)] for i in range(n_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model_dir(args.preset, Path(tmp))
        proc, url = start_server(model_dir, max(args.levels), args.threads)
        try:
            run_level(url, 1, prompts[:2], 4)  # warm-up
            ref = run_level(url, 1, prompts, args.new_tokens)  # every prompt served alone: the reference
            alone = {r["prompt"]: r["text"] for r in ref["results"]}
            runs: dict[int, list[dict]] = {c: [] for c in args.levels}
            for _ in range(args.rounds):  # levels interleaved, so a busy moment on the machine hits them all
                for c in args.levels:
                    runs[c].append(run_level(url, c, prompts[:max(args.requests, 2 * c)], args.new_tokens))
            levels = [merge(rs) for rs in runs.values()]
        finally:
            proc.terminate()
            proc.wait(60)
    matched = sum(r["text"] == alone[r["prompt"]] for lv in levels for r in lv["results"])
    total = sum(len(lv["results"]) for lv in levels)
    by = {lv["clients"]: lv for lv in levels}
    ratio = by[max(by)]["tok_per_s"] / by[min(by)]["tok_per_s"] if len(by) > 1 else None
    summary = {"model": str(args.model or f"{args.preset} (random weights)"), "new_tokens": args.new_tokens,
               "levels": [{k: v for k, v in lv.items() if k != "results"} for lv in levels],
               "ratio": round(ratio, 2) if ratio else None, "greedy_identical": f"{matched}/{total}"}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"model: {summary['model']}, {args.new_tokens} new tokens per request, greedy, streaming")
        print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'(rounds)':>22} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'tok p50':>8} {'tok p99':>8}  (ms)")
        for lv in summary["levels"]:
            rounds = "/".join(f"{x:.0f}" for x in lv["tok_per_s_rounds"])
            print(f"{lv['clients']:>7} {lv['requests']:>8} {lv['tokens']:>7} {lv['seconds']:>8} {lv['tok_per_s']:>8} "
                  f"{rounds:>22} "
                  f"{lv['ttft_p50_ms']:>9} {lv['ttft_p99_ms']:>9} {lv['token_p50_ms']:>8} {lv['token_p99_ms']:>8}")
        if ratio:
            print(f"aggregate throughput {max(by)} vs {min(by)} clients: {ratio:.2f}x (goal >= 4x)")
        print(f"greedy streams identical to the same request served alone: {matched}/{total}")
    return 0 if matched == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
