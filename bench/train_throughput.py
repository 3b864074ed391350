"""Training throughput: lmforge's Trainer vs a plain loop over transformers' LlamaForCausalLM.

Same Llama-style shape, same initial weights (converted with lmforge's HF adapter), same AdamW
hyperparameters, same random token batches, fp32. Each side runs in its own fresh process (so peak
memory is measured per side) and the two alternate A B A B ...; the figures are medians over all
measured steps. MFU is against the fp32 matmul peak measured in this same run.

    .venv/bin/python bench/train_throughput.py                 # 6 layers, dim 384, seq 256, batch 8
    .venv/bin/python bench/train_throughput.py --rounds 4 --steps 12 --json
    .venv/bin/python bench/train_throughput.py --profile        # where lmforge's step time goes

Not part of the test suite. Prints tokens/s of each side, the ratio, MFU and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def model_config(args):
    from lmforge.models.config import ModelConfig

    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       ffn_hidden=args.ffn, max_seq_len=args.seq, activation="swiglu", norm="rmsnorm",
                       pos_encoding="rope", tie_embeddings=False)


def batches(args, n):
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen) for _ in range(n)]


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def mem_before(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 1e9
    return rss_gb()


def mem_peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return peak_rss_gb()


# ---- workers (one fresh process each) ---------------------------------------------------------
def worker_lmforge(args, device) -> dict:
    import torch

    from lmforge.config import from_dict
    from lmforge.models.transformer import build_model
    from lmforge.train.config import PretrainConfig
    from lmforge.train.trainer import Trainer

    mcfg = model_config(args)
    model = build_model(mcfg, device=device, seed=0)
    data = batches(args, args.warmup + args.steps)

    class Source:
        i = 0

        def next_batch(self):
            self.i += 1
            return data[self.i - 1]

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, s):
            self.i = s["i"]

    run_dir = tempfile.mkdtemp(prefix="lmforge-bench-")
    cfg = from_dict(PretrainConfig, {
        "run": {"dir": run_dir}, "model": {"preset": "tiny"}, "data": {"dir": "-", "seq_len": args.seq},
        "train": {"global_batch": args.batch, "micro_batch": args.batch, "max_steps": args.warmup + args.steps,
                  "compile": args.compile, "resume": "never"},
        "optim": {"lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0, "fused": args.fused},
        "schedule": {"name": "constant"}, "eval": {"batches": 0, "at_start": False},
        "checkpoint": {"interval": 0, "at_end": False, "save_model": False},
        "log": {"interval": 1, "progress": False, "peak_tflops": 1.0},
    })
    trainer = Trainer(cfg, model, Source(), None, total_steps=args.warmup + args.steps, device=device,
                      flops_per_token=mcfg.flops_per_token(args.seq), resume_from=None)
    base = mem_before(device)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            trainer.fit()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
    else:
        trainer.fit()
    peak = mem_peak(device)
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    return {"step_times": [r["step_time"] for r in train[args.warmup:]], "loss": [r["loss"] for r in train],
            "peak_mem_gb": peak - base}


def worker_hf(args, device) -> dict:
    import torch
    import transformers

    from lmforge.models.hf import family_for_model_config, lmforge_to_hf_state_dict, model_config_to_hf
    from lmforge.models.transformer import build_model

    transformers.logging.set_verbosity_error()
    mcfg = model_config(args)
    src = build_model(mcfg, device="cpu", seed=0)
    hf_cfg = model_config_to_hf(mcfg)
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    config = transformers.LlamaConfig(**hf_cfg)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config)
    sd = lmforge_to_hf_state_dict(family_for_model_config(mcfg), mcfg, src.state_dict())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)
    del src
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    data = batches(args, args.warmup + args.steps)
    base = mem_before(device)
    times, losses = [], []
    for i, x in enumerate(data):
        t0 = time.perf_counter()
        x = x.to(device)
        # T tokens in and T targets, exactly lmforge's (inputs = x[:, :-1], targets = x[:, 1:]);
        # shift_labels makes HF's own loss use the targets as given instead of shifting them again
        targets = x[:, 1:].contiguous()
        loss = model(input_ids=x[:, :-1], labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"step_times": times, "loss": losses, "peak_mem_gb": mem_peak(device) - base}


# ---- driver ------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="measured steps per round and side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps at the start of each worker")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds (alternating which side goes first)")
    p.add_argument("--compile", action="store_true", help="torch.compile lmforge's model (train.compile)")
    p.add_argument("--fused", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="lmforge AdamW fused=true/false (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="one lmforge worker under torch.profiler")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=["lmforge", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        out = (worker_lmforge if args.worker == "lmforge" else worker_hf)(args, device)
        print(json.dumps(out))
        return 0
    if args.profile:
        cmd = [sys.executable, __file__, "--worker", "lmforge", "--profile"] + _pass_through(args)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return 0

    from lmforge.train.metrics import measure_matmul_flops

    peak = measure_matmul_flops(device, torch.float32, n=2048, seconds=2.0)
    results: dict[str, list[dict]] = {"lmforge": [], "hf": []}
    for r in range(args.rounds):
        order = ["lmforge", "hf"] if r % 2 == 0 else ["hf", "lmforge"]
        for side in order:
            cmd = [sys.executable, __file__, "--worker", side] + _pass_through(args)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side].append(res)
            tps = args.batch * args.seq / statistics.median(res["step_times"])
            print(f"round {r + 1} {side:>8}: {tps:,.0f} tok/s (median step {statistics.median(res['step_times']):.3f}s)",
                  file=sys.stderr)
    peak_after = measure_matmul_flops(device, torch.float32, n=2048, seconds=2.0)
    peak = max(peak, peak_after)  # the machine is shared: the best sustained figure of the two
    mcfg = model_config(args)
    tokens = args.batch * args.seq
    summary = {"config": {k: getattr(args, k) for k in ("layers", "dim", "heads", "ffn", "vocab", "seq", "batch",
                                                         "steps", "rounds", "compile")},
               "params": mcfg.num_params(), "flops_per_token": mcfg.flops_per_token(args.seq),
               "fp32_matmul_peak_gflops": peak / 1e9, "threads": torch.get_num_threads()}
    for side, runs in results.items():
        times = [t for res in runs for t in res["step_times"]]
        tps = tokens / statistics.median(times)
        summary[side] = {"tok_per_s": tps, "mfu": tps * mcfg.flops_per_token(args.seq) / peak,
                         "peak_mem_gb": statistics.median(res["peak_mem_gb"] for res in runs),
                         "first_loss": runs[0]["loss"][0]}
    summary["ratio"] = summary["lmforge"]["tok_per_s"] / summary["hf"]["tok_per_s"]
    summary["same_start_loss"] = abs(summary["lmforge"]["first_loss"] - summary["hf"]["first_loss"]) < 1e-4
    if args.json:
        print(json.dumps(summary))
    else:
        lm, hf = summary["lmforge"], summary["hf"]
        print(f"fp32 matmul peak {peak / 1e9:,.0f} GFLOP/s ({summary['threads']} threads); "
              f"{mcfg.num_params() / 1e6:.1f}M params, {args.batch}x{args.seq} tokens/step")
        print(f"lmforge: {lm['tok_per_s']:,.0f} tok/s, MFU {lm['mfu']:.1%}, peak mem +{lm['peak_mem_gb']:.2f} GB")
        print(f"HF loop: {hf['tok_per_s']:,.0f} tok/s, MFU {hf['mfu']:.1%}, peak mem +{hf['peak_mem_gb']:.2f} GB")
        print(f"ratio lmforge / HF: {summary['ratio']:.2f}x (first-step losses {lm['first_loss']:.4f} vs "
              f"{hf['first_loss']:.4f})")
    return 0


def _pass_through(args) -> list[str]:
    out = []
    for k in ("layers", "dim", "heads", "ffn", "vocab", "seq", "batch", "steps", "warmup", "device", "threads"):
        if getattr(args, k) is not None:
            out += [f"--{k}", str(getattr(args, k))]
    if args.compile:
        out.append("--compile")
    if args.fused is not None:
        out += ["--fused", str(args.fused)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
