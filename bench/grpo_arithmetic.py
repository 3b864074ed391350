"""GRPO demonstration on CPU: a tiny model SFT'd on synthetic addition (held-out split), then either GRPO
(reward: the answer check) or more SFT for the same wall time; held-out greedy exact-match accuracy of each.

    python bench/grpo_arithmetic.py OUT_DIR [--sft-steps 300] [--grpo-steps 40]

Writes OUT_DIR/results.json and, when matplotlib is installed, OUT_DIR/grpo_arithmetic.png (reward and
accuracy curves)."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from lmforge.artifacts.model_dir import load_model_dir, save_model_dir
from lmforge.generate.engine import generate
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model
from lmforge.tasks.config import config_from_dict
from lmforge.tasks.grpo_rewards import answer_matches
from lmforge.tasks.run import run
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer

COMMON = {"train": {"device": "cpu", "threads": 2, "seed": 0}, "schedule": {"name": "constant"},
          "checkpoint": {"interval": 0}, "log": {"interval": 5, "progress": False, "peak_tflops": 1.0}}


def problems(n_max: int, seed: int = 0):
    pairs = [(a, b) for a in range(n_max) for b in range(n_max)]
    random.Random(seed).shuffle(pairs)
    return pairs


def accuracy(model_dir: Path, test) -> float:
    model, tok = load_model_dir(model_dir), load_tokenizer(model_dir)
    outs = generate(model, [f"{a}+{b}=" for a, b in test], tok, max_new_tokens=4)
    return sum(answer_matches(o, str(a + b)) for o, (a, b) in zip(outs, test)) / len(test)


def cfg(base: Path, run_dir: Path, mode: str, train_file: Path, steps: int, **extra):
    data = {"run": {"dir": str(run_dir)}, "model": {"from": str(base)}, "finetune": {"mode": mode},
            "data": {"train": [str(train_file)], "dev_fraction": 0.0, "seq_len": 24,
                     **({"batching": "shuffle"} if mode == "sft" else {})},
            "eval": {"interval": 0, "keep_best": False, "batches": 0, "at_start": False}, **COMMON}
    data["train"] = {**COMMON["train"], "max_steps": steps}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v}
    return config_from_dict(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-max", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=40)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pairs = problems(args.n_max)
    test, train = pairs[:150], pairs[150:]
    lines = [f"{a}+{b}={a + b}" for a, b in pairs]
    (out / "corpus.txt").write_text("\n".join(lines * 3))
    train_tokenizer([str(out / "corpus.txt")], 300, out / "tok", txt_mode="line", progress=False)
    mcfg = ModelConfig(vocab_size=320, dim=96, n_layers=3, n_heads=4, ffn_hidden=256, max_seq_len=32)
    base = save_model_dir(build_model(mcfg, seed=0), out / "base", tokenizer_dir=str(out / "tok"))
    sft_file, rl_file = out / "sft.jsonl", out / "prompts.jsonl"
    sft_file.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                                for a, b in train))
    rl_file.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a, b in train))

    t0 = time.perf_counter()
    run(cfg(base, out / "sft", "sft", sft_file, args.sft_steps, train={"global_batch": 32, "micro_batch": 32},
            optim={"lr": 3e-3}))
    sft_model = out / "sft" / "model"
    acc_sft = accuracy(sft_model, test)
    print(f"SFT {args.sft_steps} steps ({time.perf_counter() - t0:.0f}s): held-out accuracy {acc_sft:.3f}", flush=True)

    t0 = time.perf_counter()
    run(cfg(sft_model, out / "grpo", "grpo", rl_file, args.grpo_steps, train={"global_batch": 64, "micro_batch": 64},
            optim={"lr": 5e-4}, grpo={"num_generations": 8, "max_completion_length": 4, "temperature": 1.0,
                                      "sample_interval": 0, "eval_max_prompts": 0}))
    t_grpo = time.perf_counter() - t0
    acc_grpo = accuracy(out / "grpo" / "model", test)
    print(f"GRPO {args.grpo_steps} steps ({t_grpo:.0f}s): held-out accuracy {acc_grpo:.3f}", flush=True)

    # more SFT for the same wall time: measure its speed on 20 steps, then run as many as fit in t_grpo
    t0 = time.perf_counter()
    run(cfg(sft_model, out / "sft_probe", "sft", sft_file, 20, train={"global_batch": 32, "micro_batch": 32},
            optim={"lr": 3e-3}))
    per_step = (time.perf_counter() - t0) / 20
    extra = max(1, int(t_grpo / per_step))
    t0 = time.perf_counter()
    run(cfg(sft_model, out / "sft_more", "sft", sft_file, extra, train={"global_batch": 32, "micro_batch": 32},
            optim={"lr": 3e-3}))
    acc_more = accuracy(out / "sft_more" / "model", test)
    print(f"SFT +{extra} steps ({time.perf_counter() - t0:.0f}s): held-out accuracy {acc_more:.3f}", flush=True)

    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["reward"]) for r in rows if r.get("kind") == "train" and "reward" in r]
    res = {"held_out": len(test), "sft_steps": args.sft_steps, "acc_sft": acc_sft, "grpo_steps": args.grpo_steps,
           "grpo_seconds": t_grpo, "acc_grpo": acc_grpo, "sft_more_steps": extra, "acc_sft_more": acc_more,
           "reward_curve": curve}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot([s for s, _ in curve], [r for _, r in curve])
    ax[0].set(xlabel="GRPO step", ylabel="mean reward (train rollouts)", title="reward")
    ax[1].bar(["SFT", f"SFT + GRPO ({args.grpo_steps})", f"SFT + SFT ({extra})"], [acc_sft, acc_grpo, acc_more])
    ax[1].set(ylabel="held-out exact match", title="accuracy, same extra wall time")
    fig.tight_layout()
    fig.savefig(out / "grpo_arithmetic.png", dpi=100)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
