"""`lmforge serve` under load: concurrent streaming clients against one server, alone or side by side with
`transformers serve --continuous-batching` on the same weights.

    python bench/serve.py                              # the `small` preset (8M), random weights, CPU
    python bench/serve.py --model RUN/model            # a real model dir
    python bench/serve.py --preset tiny --new-tokens 32 --levels 1 4 16 --json
    python bench/serve.py --against transformers --models small-v2048 small-v8192 ctx2048 \
        --levels 1 4 16 64 --rounds 3 --mix        # lmforge vs transformers, three models, one run

Starts `lmforge serve` as its own process on 127.0.0.1 (``--max-batch`` = the highest level). A first pass
serves every prompt alone (the reference texts); then ``--rounds`` rounds run every level in turn (levels
interleaved, so a busy moment on a shared machine does not land on one level only): that many client threads,
each streaming greedy chat completions (``stream: true``) from a shared list of prompts. Per level it prints
the median round's aggregate completion tokens/s (and each round's), p50/p99 time to first token (TTFT) and
p50/p99 time between streamed chunks (about one token each), pooled over the rounds. Every greedy stream's
text is compared with the same prompt served alone; the last lines give the 16-vs-1 throughput ratio (goal
>= 4x on a CPU) and how many streams matched.

``--against transformers``: for each of ``--models`` (random-weight lmforge models built here, exported with
`lmforge export --format hf`), both servers run at once, each with its own defaults (lmforge: no flags but
``--max-batch``; transformers: ``--continuous-batching --device cpu``; both allow the model's full context),
and every (round, level) measures one server and then the other back to back, alternating which goes first,
so both see the same machine. Per level: each server's median aggregate tok/s, the lmforge / transformers
ratio of every round (the spread), TTFT and inter-token p50/p99. ``--mix``: 8 short-prompt streams while
long prompts (60% of the context) arrive one after another: the short streams' inter-token p50/p99 and the
long prompts' TTFT. Greedy texts of the two servers are compared request by request.

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
SHAKESPEARE = next((d / "shared" / "data" / "tinyshakespeare" / "input.txt" for d in (ROOT.parent, ROOT.parent.parent)
                    if (d / "shared" / "data" / "tinyshakespeare" / "input.txt").is_file()),
                   ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt")
FALLBACK_LINES = ["The quick brown fox jumps over the lazy dog.", "你好，世界。今天天气很好。",
                  "Serving models with continuous batching.", "To be, or not to be, that is the question."]


def corpus_lines() -> list[str]:
    if SHAKESPEARE.is_file():
        return [s for s in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if len(s) > 20][:4000]
    return FALLBACK_LINES * 50


# --against: models of different vocabularies and contexts (random weights, the llama recipe, exportable to HF)
MODELS = {
    "small-v2048": {"preset": "small", "vocab_size": 2048},  # 8.3M-class, context 512
    "small-v8192": {"preset": "small", "vocab_size": 8192},
    "ctx2048": {"preset": "small", "vocab_size": 4096, "dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2,
                    "ffn_hidden": 704, "max_seq_len": 2048},
}


def build_model_dir(preset: str, out: Path, vocab_size: int = 2048, name: str | None = None, **overrides) -> Path:
    import dataclasses

    import torch

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    (out / "corpus.txt").write_text("\n".join(corpus_lines()), encoding="utf-8")
    tok_dir = out / f"tok-{vocab_size}"
    tok = train_tokenizer([str(out / "corpus.txt")], vocab_size - 48, tok_dir, progress=False)
    cfg = dataclasses.replace(get_preset(preset), vocab_size=vocab_size, **overrides)
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # no EOS / special tokens / ids past the tokenizer: every request generates --new-tokens
        for t in set(tok.special_tokens.values()) | {tok.eos_id} - {None}:
            model.output.weight[t] = 0.0
        model.output.weight[tok.vocab_size:] = 0.0
    return save_model_dir(model, out / (name or f"{preset}-random"), tokenizer_dir=str(tok_dir))


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


def start_transformers(hf_dir: Path, port: int, threads: int | None = None):
    """`transformers serve --continuous-batching` on ``hf_dir`` (offline, CPU, its default threads)."""
    import httpx

    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe), "serve", "--continuous-batching", "--device", "cpu", "--port", str(port), "--host",
           "127.0.0.1", str(hf_dir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if threads:  # torch takes its intra-op thread count from OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"error: transformers serve exited ({proc.returncode}); run it by hand: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
    proc.kill()
    raise SystemExit("error: transformers serve did not answer within 300 s")


def stream_one(client, url: str, prompt: str, new_tokens: int, model: str = "bench") -> dict:
    """One streaming chat request: its text, completion tokens, TTFT and the gaps between content chunks."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
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


def run_level(url: str, clients: int, prompts: list[str], new_tokens: int, model: str = "bench") -> dict:
    import httpx

    todo, lock, results = list(prompts), threading.Lock(), []

    def client_loop():
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    prompt = todo.pop(0)
                res = stream_one(client, url, prompt, new_tokens, model)
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


def run_mix(url: str, short_prompts: list[str], long_prompt: str, new_tokens: int, model: str,
            n_long: int = 3) -> dict:
    """8 short-prompt streams running while ``n_long`` long prompts arrive one after another."""
    import httpx

    out: dict = {}

    def long_loop():
        with httpx.Client(timeout=600) as client:
            time.sleep(0.5)  # the short streams are running
            out["long"] = [stream_one(client, url, long_prompt, 8, model) for _ in range(n_long)]

    t = threading.Thread(target=long_loop)
    t.start()
    short = run_level(url, 8, short_prompts, new_tokens, model)
    t.join()
    gaps = sorted(g for r in short["results"] for g in r["gaps"])
    ttft = sorted(r["ttft"] for r in out["long"] if r["ttft"] is not None)
    return {"tok_per_s": short["tok_per_s"], "token_p50_ms": pct(gaps, 50), "token_p99_ms": pct(gaps, 99),
            "long_ttft_p50_ms": pct(ttft, 50), "results": short["results"]}


def long_text(tokenizer_dir: Path, tokens: int) -> str:
    from lmforge.tokenizer.core import load_tokenizer

    tok, lines, text = load_tokenizer(tokenizer_dir), corpus_lines(), ""
    i = 0
    while len(tok.encode(text)) < tokens:
        text += lines[(i * 31) % len(lines)] + " "
        i += 1
    return text


def compare(args) -> int:
    """lmforge serve vs transformers serve --continuous-batching, side by side, per model."""
    import httpx

    lines = corpus_lines()
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for i_model, name in enumerate(args.models):
            spec = dict(MODELS[name])
            work = Path(tmp) / name
            work.mkdir()
            model_dir = build_model_dir(spec.pop("preset"), work, name=name, **spec)
            hf_dir = work / "hf"
            subprocess.run([sys.executable, "-m", "lmforge", "export", "--model", str(model_dir), "--format", "hf",
                            "--out", str(hf_dir)], check=True, stdout=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
            lm, lm_url = start_server(model_dir, max(args.levels), args.threads)
            # a port per model: the previous model's server may still hold its port for a moment
            tf, tf_url = start_transformers(hf_dir, args.port + i_model, args.transformers_threads)
            servers = {"lmforge": (lm_url, "bench"), "transformers": (tf_url, str(hf_dir))}
            n_prompts = max(args.requests, max(args.levels))
            prompts = [lines[(i * 97) % len(lines)] for i in range(n_prompts)]
            context = MODELS[name].get("max_seq_len", 512)
            long_prompt = long_text(model_dir, int(0.6 * context))
            try:
                for url, m in servers.values():  # warm-up, and each prompt alone: the reference texts
                    run_level(url, 1, prompts[:2], 4, m)
                alone = {k: {r["prompt"]: r["text"] for r in run_level(url, 1, prompts[:args.requests],
                                                                         args.new_tokens, m)["results"]}
                         for k, (url, m) in servers.items()}
                runs = {k: {c: [] for c in args.levels + (["mix"] if args.mix else [])} for k in servers}
                for rnd in range(args.rounds):
                    for c in args.levels + (["mix"] if args.mix else []):
                        order = list(servers) if (rnd + len(str(c))) % 2 == 0 else list(servers)[::-1]
                        for k in order:
                            url, m = servers[k]
                            if c == "mix":
                                runs[k][c].append(run_mix(url, prompts[:16], long_prompt, args.new_tokens, m))
                            else:
                                runs[k][c].append(run_level(url, c, prompts[:max(args.requests, c)],
                                                            args.new_tokens, m))
                        for k, proc in (("lmforge", lm), ("transformers", tf)):
                            if proc.poll() is not None or runs[k][c][-1]["tok_per_s"] == 0:
                                raise SystemExit(f"error: the {k} server stopped answering during {name} "
                                                 f"(exit {proc.poll()}); rerun with --models {name}")
                        print(f"{name} round {rnd + 1} {c}: " + ", ".join(
                            f"{k} {runs[k][c][-1]['tok_per_s']:.0f} tok/s" for k in servers), flush=True)
            finally:
                for proc in (lm, tf):
                    proc.terminate()
                    proc.wait(60)
            same = sum(alone["lmforge"][p] == alone["transformers"][p] for p in alone["lmforge"])
            consistent = {k: sum(r["text"] == alone[k][r["prompt"]] for c in args.levels for run in runs[k][c]
                                 for r in run["results"] if r["prompt"] in alone[k]) for k in servers}
            total = sum(1 for c in args.levels for run in runs["lmforge"][c] for r in run["results"]
                        if r["prompt"] in alone["lmforge"])
            entry = {"model": name, "levels": [], "texts_equal_across_servers": f"{same}/{len(alone['lmforge'])}",
                     "batched_equal_alone": {k: f"{v}/{total}" for k, v in consistent.items()}}
            for c in runs["lmforge"]:
                row = {"clients": c}
                for k in servers:
                    rs = runs[k][c]
                    if c == "mix":
                        row[k] = {"tok_per_s": statistics.median(r["tok_per_s"] for r in rs),
                                  "token_p50_ms": statistics.median(r["token_p50_ms"] for r in rs),
                                  "token_p99_ms": statistics.median(r["token_p99_ms"] for r in rs),
                                  "long_ttft_p50_ms": statistics.median(r["long_ttft_p50_ms"] for r in rs)}
                    else:
                        mg = merge(rs)
                        row[k] = {x: mg[x] for x in ("tok_per_s", "tok_per_s_rounds", "ttft_p50_ms", "ttft_p99_ms",
                                                     "token_p50_ms", "token_p99_ms")}
                ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in zip(runs["lmforge"][c], runs["transformers"][c])]
                row["ratio_rounds"] = [round(r, 2) for r in ratios]
                row["ratio_median"] = round(statistics.median(ratios), 2)
                entry["levels"].append(row)
            lm_by = {r["clients"]: r["lmforge"]["tok_per_s"] for r in entry["levels"] if r["clients"] != "mix"}
            if 1 in lm_by and 16 in lm_by:
                entry["lmforge_16_vs_1"] = round(lm_by[16] / lm_by[1], 2)
            summary.append(entry)
            print_entry(entry)
    if args.json:
        print(json.dumps(summary))
    del httpx
    return 0


def print_entry(e: dict) -> None:
    print(f"\nmodel {e['model']}: greedy texts lmforge == transformers {e['texts_equal_across_servers']}; "
          f"batched == alone {e['batched_equal_alone']}; lmforge 16 vs 1 clients {e.get('lmforge_16_vs_1')}x")
    print(f"{'clients':>7} {'lmforge tok/s':>14} {'transformers':>13} {'ratio (rounds)':>26} "
          f"{'TTFT p50/p99 lm | tf':>24} {'tok p50/p99 lm | tf (ms)':>28}")
    for r in e["levels"]:
        a, b = r["lmforge"], r["transformers"]
        rounds = "/".join(f"{x:.2f}" for x in r["ratio_rounds"])
        if r["clients"] == "mix":
            ttft = f"long {a['long_ttft_p50_ms']:.0f} | {b['long_ttft_p50_ms']:.0f}"
        else:
            ttft = f"{a['ttft_p50_ms']:.0f}/{a['ttft_p99_ms']:.0f} | {b['ttft_p50_ms']:.0f}/{b['ttft_p99_ms']:.0f}"
        tok = f"{a['token_p50_ms']:.1f}/{a['token_p99_ms']:.0f} | {b['token_p50_ms']:.1f}/{b['token_p99_ms']:.0f}"
        print(f"{r['clients']:>7} {a['tok_per_s']:>14.1f} {b['tok_per_s']:>13.1f} "
              f"{str(r['ratio_median']) + ' (' + rounds + ')':>26} {ttft:>24} {tok:>28}", flush=True)


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
    p.add_argument("--against", choices=["transformers"], default=None,
                   help="side by side with `transformers serve --continuous-batching` on the --models")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--mix", action="store_true", help="with --against: also long prompts among 8 short streams")
    p.add_argument("--port", type=int, default=8791, help="with --against: the transformers server's port")
    p.add_argument("--transformers-threads", type=int, default=None,
                   help="with --against: OMP_NUM_THREADS of the transformers server (default: torch's choice)")
    args = p.parse_args(argv)
    if args.against:
        return compare(args)

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
