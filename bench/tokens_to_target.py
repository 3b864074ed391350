"""Tokens (and wall time) each training recipe needs to reach a fixed validation bits/byte.

The corpus is the quickstart's (the running Python's standard-library sources, its tokenizer and token
shards, made by `lmforge.tasks.quickstart.prepare_data`), the model the `small` preset, the baseline the
quickstart's earlier recipe (AdamW, SwiGLU, cosine schedule; pinned here) with its lr, betas and weight
decay. Each recipe changes only what its name says, and runs once per seed through the real `pretrain`
(Trainer, loader, validation); runs are interleaved seed by seed so that load from other processes on a
shared machine hits every recipe alike.

    .venv/bin/python bench/tokens_to_target.py                         # the full-size comparison
    .venv/bin/python bench/tokens_to_target.py --seq-len 64 --batch 8 --steps 60 --eval-every 10 --threads 1 \
        --recipes adamw,muon,qk_norm,relu2,softcap,zloss,wsd,muon+relu2,muon+relu2+wsd   # README "Recipe"

Recipes (``--recipes``, comma-separated; join with ``+`` to combine, e.g. ``muon+qk_norm``): see RECIPES.
The target (``--target-bpb``; default: the worst final validation bits/byte of the AdamW seeds, so every
AdamW seed reaches it) is crossed between two evaluations; the tokens and the training wall time (evaluation
excluded) at the crossing are interpolated linearly. Also printed: Muon's tokens to each AdamW seed's own
final validation loss over that seed's total tokens (the issue's goal: <= 0.7).

Finished runs are kept in ``--out`` and reused (delete a run's folder to redo it); a plot of validation
bits/byte against tokens goes to ``--plot``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> dotted config overrides on top of the quickstart's config (lmforge/recipes/quickstart.yaml)
RECIPES: dict[str, dict[str, object]] = {
    "adamw": {},
    "muon": {"optim.name": "muon"},  # Muon for the blocks' matrices (RMS-matched, AdamW's lr), AdamW for the rest
    "qk_norm": {"model.qk_norm": True},
    "relu2": {"model.activation": "relu2", "model.ffn_hidden": "iso"},  # 1.5x the SwiGLU width: same parameters
    "softcap": {"model.logit_softcap": 15.0},
    "zloss": {"train.z_loss": 1e-4},
    "wsd": {"schedule.name": "wsd"},
}


def recipe_overrides(name: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in name.split("+"):
        if part not in RECIPES:
            raise SystemExit(f"error: recipe '{part}' is not one of {', '.join(RECIPES)} (join with '+')")
        out.update(RECIPES[part])
    return out


def run_config(args, recipe: str, seed: int, shard_dir: Path, run_dir: Path):
    from lmforge.config import apply_overrides, from_dict
    from lmforge.models.presets import get_preset
    from lmforge.tasks.quickstart import quickstart_recipe
    from lmforge.train.config import PretrainConfig, validate

    data = quickstart_recipe()  # batch, lr, betas, weight decay, warmup, min_lr: the quickstart's
    # The baseline recipe is pinned (the quickstart's recipe before this benchmark changed it: AdamW, the
    # preset's SwiGLU MLP, cosine schedule), so that a new quickstart recipe does not move the baseline.
    data["model"] = {"preset": args.preset}
    data["optim"]["name"] = "adamw"
    data["schedule"]["name"] = "cosine"
    data["run"] = {"dir": str(run_dir), "name": f"{recipe} seed {seed}"}
    data["data"] = {**data["data"], "dir": str(shard_dir), "seq_len": args.seq_len}
    data["train"].update(global_batch=args.batch, micro_batch=args.batch, seed=seed, max_steps=args.steps,
                         resume="never", device="cpu", threads=args.threads)
    data["schedule"]["warmup_steps"] = max(1, round(args.steps * args.warmup_fraction))
    data["eval"] = {"interval": args.eval_every, "batches": args.eval_batches, "batch_size": args.batch,
                    "at_start": True}
    data["checkpoint"] = {"interval": 0, "at_end": False, "save_model": False}
    data["log"] = {"interval": 1, "progress": False}  # a row per step: the wall-time clock of the crossing
    chosen = recipe_overrides(recipe)
    if chosen.get("model.ffn_hidden") == "iso":  # two matrices as wide as the SwiGLU's three hold
        chosen["model.ffn_hidden"] = get_preset(args.preset).hidden_dim * 3 // 2
    overrides = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in chosen.items()]

    cfg = from_dict(PretrainConfig, apply_overrides(data, overrides))
    validate(cfg)
    return cfg


def read_curve(run_dir: Path) -> dict | None:
    """{evals: [(step, tokens, train_seconds, val_bpb, val_loss)], done} from metrics.jsonl, or None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    clock, t = {0: 0.0}, 0.0
    for r in rows:
        if r.get("kind") == "train":  # log.interval=1: step_time is that one step's time
            t += r["step_time"]
            clock[r["step"]] = t
    evals = [(r["step"], r["tokens"], clock.get(r["step"]), r["val_bpb"], r["val_loss"])
             for r in rows if r.get("kind") == "eval" and "val_bpb" in r]
    done = any(r.get("event") == "end" and r.get("reason") == "max_steps" for r in rows)
    return {"evals": evals, "done": done}


def crossing(evals: list, target: float, col: int = 3) -> tuple[float, float] | None:
    """(tokens, seconds) where the evaluations' column ``col`` (3: bits/byte, 4: loss) first reaches
    ``target``, linear between evaluations."""
    for e0, e1 in itertools.pairwise(evals):
        v0, v1 = e0[col], e1[col]
        if v1 <= target:
            f = 1.0 if v0 == v1 else min(1.0, max(0.0, (v0 - target) / (v0 - v1)))
            return e0[1] + f * (e1[1] - e0[1]), e0[2] + f * (e1[2] - e0[2])
    return None


def summarize(curves: dict, recipes: list[str], seeds: list[int], target: float | None) -> dict:
    base = [curves[("adamw", s)] for s in seeds if ("adamw", s) in curves]
    if target is None:
        if not base:
            raise SystemExit("error: no finished adamw run to take the target from; add adamw to --recipes "
                             "or pass --target-bpb")
        target = max(c["evals"][-1][3] for c in base)
    rows = []
    for name in recipes:
        runs = [(s, curves[(name, s)]) for s in seeds if (name, s) in curves]
        hits = {s: crossing(c["evals"], target) for s, c in runs}
        reached = [h for h in hits.values() if h is not None]
        row = {"recipe": name, "seeds": [s for s, _ in runs],
               "tokens": {s: (round(h[0]) if h else None) for s, h in hits.items()},
               "seconds": {s: (round(h[1], 1) if h else None) for s, h in hits.items()},
               "final_bpb": statistics.mean(c["evals"][-1][3] for _, c in runs) if runs else None,
               "total_tokens": runs[0][1]["evals"][-1][1] if runs else None,
               "train_seconds": statistics.mean(c["evals"][-1][2] for _, c in runs) if runs else None}
        if runs and len(reached) == len(runs):
            row["mean_tokens"] = statistics.mean(h[0] for h in reached)
            row["mean_seconds"] = statistics.mean(h[1] for h in reached)
        rows.append(row)
    by_name = {r["recipe"]: r for r in rows}
    if "mean_tokens" in by_name.get("adamw", {}):
        for r in rows:
            if "mean_tokens" in r:
                r["ratio"] = r["mean_tokens"] / by_name["adamw"]["mean_tokens"]
    # The goal: Muon's tokens to each AdamW seed's own final validation loss / that seed's tokens.
    muon_goal = {}
    for name in recipes:
        if "muon" not in name.split("+"):
            continue
        per_seed = {}
        for s in seeds:
            if ("adamw", s) in curves and (name, s) in curves:
                a = curves[("adamw", s)]["evals"][-1]
                hit = crossing(curves[(name, s)]["evals"], a[4], col=4)
                per_seed[s] = None if hit is None else hit[0] / a[1]
        muon_goal[name] = per_seed
    return {"target_bpb": target, "rows": rows, "muon_vs_adamw_final_loss": muon_goal}


def plot(curves: dict, recipes: list[str], seeds: list[int], target: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(recipes):
        for j, s in enumerate(seeds):
            c = curves.get((name, s))
            if not c:
                continue
            ev = [e for e in c["evals"] if e[0] > 0]  # the step-0 point (~log2 vocab) squashes the axis
            ax.plot([e[1] / 1e3 for e in ev], [e[3] for e in ev], color=colors[i % len(colors)],
                    linestyle="-" if j == 0 else "--", label=name if j == 0 else None, linewidth=1.4)
    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], target, f" target {target:.3f}", va="bottom", color="gray", fontsize=8)
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation bits/byte")
    ax.set_title(title, fontsize=9)
    ax.legend(title="recipe (solid: seed 0, dashed: seed 1)", fontsize=8, title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict, seeds: list[int]) -> str:
    lines = [f"target: {summary['target_bpb']:.3f} validation bits/byte",
             "| recipe | tokens to target (" + ", ".join(f"seed {s}" for s in seeds) + ") | mean | ratio vs adamw "
             "| train s to target (mean) | final bits/byte (mean) |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        toks = ", ".join(f"{r['tokens'][s]:,}" if r["tokens"].get(s) is not None else "not reached"
                         for s in r["seeds"])
        mean = f"{r['mean_tokens']:,.0f}" if "mean_tokens" in r else "—"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "—"
        secs = f"{r['mean_seconds']:.0f}" if "mean_seconds" in r else "—"
        final = f"{r['final_bpb']:.3f}" if r["final_bpb"] is not None else "—"
        lines.append(f"| {r['recipe']} | {toks} | {mean} | {ratio} | {secs} | {final} |")
    for name, per_seed in summary["muon_vs_adamw_final_loss"].items():
        parts = ", ".join(f"seed {s}: {v:.2f}" if v is not None else f"seed {s}: not reached"
                          for s, v in per_seed.items())
        lines.append(f"\n{name} tokens to the AdamW seed's final validation loss / AdamW's tokens: {parts}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tokens_to_target")
    p.add_argument("--recipes", default="adamw,muon,qk_norm,relu2,softcap,zloss")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-fraction", type=float, default=1 / 30, help="warmup steps / steps (quickstart: 10/300)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run")
    p.add_argument("--data-mb", type=float, default=None, help="only the first MB of the sources")
    p.add_argument("--target-bpb", type=float, default=None)
    p.add_argument("--plot", default=str(REPO / "docs" / "images" / "tokens_to_target.png"))
    p.add_argument("--report-only", action="store_true", help="summarize the finished runs in --out; train nothing")
    args = p.parse_args(argv)
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for r in recipes:
        recipe_overrides(r)
    out = Path(args.out)
    from lmforge.tasks.quickstart import prepare_data
    from lmforge.tasks.run import run

    shard_dir = prepare_data(out / "data", args.preset, args.data_mb)
    curves: dict = {}
    for seed in seeds:  # seed-major: every recipe's runs of one seed sit side by side in time
        for name in recipes:
            run_dir = out / "runs" / f"{name}-seed{seed}"
            curve = read_curve(run_dir)
            if (curve is None or not curve["done"]) and not args.report_only:
                shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run restarts (its clock would be off)
                cfg = run_config(args, name, seed, shard_dir, run_dir)
                t0 = time.perf_counter()
                result = run(cfg).train
                if result.exit_code:  # a signal or the time guard: stop here; the next call restarts this run
                    print(f"stopped during {name} seed {seed} ({result.stop_reason})", file=sys.stderr)
                    return result.exit_code
                curve = read_curve(run_dir)
                print(f"[{name} seed {seed}] final val {curve['evals'][-1][3]:.4f} bits/byte after "
                      f"{curve['evals'][-1][1]:,} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
            if curve is not None and curve["done"]:
                curves[(name, seed)] = curve
    summary = summarize(curves, recipes, seeds, args.target_bpb)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("report_only",)}
    summary["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    title = (f"{args.preset} preset, stdlib sources, {args.batch}x{args.seq_len} tokens/step, {args.steps} steps, "
             f"seeds {args.seeds}")
    plot(curves, recipes, seeds, summary["target_bpb"], Path(args.plot), title)
    text = table(summary, seeds)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"plot: {args.plot}; results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
