"""Training throughput: lmforge's Trainer vs a plain loop over transformers' LlamaForCausalLM.

Same Llama-style shape, same initial weights (converted with lmforge's HF adapter), same AdamW
hyperparameters, same random token batches, fp32. Throughput: the sides live in one process and
alternate step by step (A B, B A, A B, ...), so load from other processes on a shared machine hits
them alike; the figures are medians. Peak memory: each side alone in a fresh process (the growth of
peak RSS — ru_maxrss — over its training steps on CPU, or CUDA max allocated), median of three.
MFU is against the fp32 matmul peak measured in this same run (best of before and after).

lmforge computes the loss in chunks of ``--loss-chunk`` tokens (train.loss_chunk_tokens; the fp32
logits of the whole batch never exist). ``--with-unchunked`` adds a third side, lmforge with
train.loss_chunk_tokens=0 (whole logits, the previous behaviour), to throughput and memory.

    .venv/bin/python bench/train_throughput.py                 # 6 layers, dim 384, seq 256, batch 8
    .venv/bin/python bench/train_throughput.py --vocab 32000 --with-unchunked   # memory the chunks save
    .venv/bin/python bench/train_throughput.py --steps 20 --json
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


# ---- the two sides -----------------------------------------------------------------------------
def lmforge_side(args, device, loss_chunk: int | None = None):
    """lmforge's Trainer over an in-memory batch source (its own loss: train.loss_chunk_tokens); returns the
    step function."""
    from lmforge.config import from_dict
    from lmforge.models.transformer import build_model
    from lmforge.train.config import PretrainConfig
    from lmforge.train.losses import CausalLMLoss
    from lmforge.train.trainer import Job, Trainer

    mcfg = model_config(args)
    model = build_model(mcfg, device=device, seed=0)
    run_dir = tempfile.mkdtemp(prefix="lmforge-bench-")
    cfg = from_dict(PretrainConfig, {
        "run": {"dir": run_dir}, "model": {"preset": "tiny"}, "data": {"dir": "-", "seq_len": args.seq},
        "train": {"global_batch": args.batch, "micro_batch": args.micro or args.batch, "max_steps": 10**6,
                  "compile": args.compile, "resume": "never",
                  "loss_chunk_tokens": args.loss_chunk if loss_chunk is None else loss_chunk},
        "optim": {"lr": 3e-4, "weight_decay": 0.1, "grad_clip": 1.0, "fused": args.fused},
        "schedule": {"name": "constant"}, "eval": {"batches": 0, "at_start": False},
        "checkpoint": {"interval": 0, "at_end": False, "save_model": False},
        "log": {"interval": 1, "progress": False, "peak_tflops": 1.0},
    })
    job = Job(model, None, 10**6, CausalLMLoss.from_config(cfg.train), flops_per_token=mcfg.flops_per_token(args.seq))
    trainer = Trainer(cfg, job, device=device)
    trainer.model.train()

    def step(x):
        out = trainer.train_step(x)  # the Trainer's own step: accumulation, normalization, clip, AdamW
        if device.type == "cuda":
            torch_sync()
        return out["loss"]

    return step


def hf_side(args, device):
    """A plain loop over transformers' LlamaForCausalLM with lmforge's initial weights."""
    import torch
    import transformers

    from lmforge.artifacts.hf.convert import lmforge_to_hf_state_dict
    from lmforge.artifacts.hf.families import family_for_model_config, model_config_to_hf
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

    def step(x):
        x = x.to(device)
        # T tokens in and T targets, exactly lmforge's (inputs = x[:, :-1], targets = x[:, 1:]);
        # shift_labels makes HF's own loss use the targets as given instead of shifting them again
        targets = x[:, 1:].contiguous()
        loss = model(input_ids=x[:, :-1], labels=targets, shift_labels=targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        if device.type == "cuda":
            torch_sync()
        return value

    return step


def torch_sync():
    import torch

    torch.cuda.synchronize()


def make_side(args, device, side: str):
    if side == "hf":
        return hf_side(args, device)
    return lmforge_side(args, device, 0 if side == "lmforge_unchunked" else None)


SIDES = ("lmforge", "lmforge_unchunked", "hf")


def memory_worker(args, device, side: str) -> dict:
    """Peak memory of one side's training steps, alone in a fresh process.

    ``--memory rss``: the growth of peak RSS (CUDA: max allocated) over warm-up + 3 steps.
    ``--memory profiler``: torch.profiler's record of every CPU allocation and free during one step after
    the warm-up (optimizer state already there): the highest running total above the step's start — what a
    step adds (activations, logits, gradients), free of allocator caching and of other processes.
    """
    step = make_side(args, device, side)
    data = batches(args, args.warmup + 3)
    if args.memory == "profiler":
        from torch.profiler import ProfilerActivity, profile

        for x in data[:max(1, args.warmup)]:
            step(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(data[-1])
        events = sorted((e.time_range.start, e.self_cpu_memory_usage if e.name != "[memory]" else e.cpu_memory_usage)
                        for e in prof.events())
        total = peak = 0
        for _, delta in events:
            total += delta
            peak = max(peak, total)
        return {"peak_mem_gb": peak / 1e9}
    base = mem_before(device)
    for x in data:
        step(x)
    return {"peak_mem_gb": mem_peak(device) - base}


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
    p.add_argument("--steps", type=int, default=12, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps at the start")
    p.add_argument("--micro", type=int, default=None, help="lmforge micro batch (default: the whole batch)")
    p.add_argument("--loss-chunk", type=int, default=1024,
                   help="lmforge train.loss_chunk_tokens (tokens per loss chunk; 0 = whole logits)")
    p.add_argument("--with-unchunked", action="store_true",
                   help="also time and measure lmforge with train.loss_chunk_tokens=0")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process memory measurements per side")
    p.add_argument("--memory", choices=["rss", "profiler"], default="rss",
                   help="peak memory as RSS growth (CUDA: max allocated) or torch.profiler's allocation record")
    p.add_argument("--memory-only", action="store_true", help="skip the throughput part")
    p.add_argument("--compile", action="store_true", help="torch.compile lmforge's model (train.compile)")
    p.add_argument("--fused", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="lmforge AdamW fused=true/false (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="one lmforge worker under torch.profiler")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)  # memory of one side
    args = p.parse_args()

    import torch

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(memory_worker(args, device, args.worker)))
        return 0
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = lmforge_side(args, device)
        data = batches(args, args.warmup + args.steps)
        for x in data[:args.warmup]:
            step(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for x in data[args.warmup:]:
                step(x)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return 0

    if args.memory_only:
        names = [s for s in SIDES if s != "lmforge_unchunked" or args.with_unchunked]
        memory = {name: [] for name in names}
        for _ in range(args.repeats):
            for side in names:
                memory[side].append(_memory_of(args, side))
        out = {"config": {k: getattr(args, k) for k in ("layers", "dim", "vocab", "seq", "batch", "loss_chunk")},
               "memory_measure": args.memory, **{n: statistics.median(v) for n, v in memory.items()},
               "runs": memory}
        print(json.dumps(out) if args.json else "\n".join(
            f"{n}: peak memory +{statistics.median(v):.3f} GB ({args.memory})" for n, v in memory.items()))
        return 0

    from lmforge.train.metrics import measure_matmul_flops

    peak = measure_matmul_flops(device, torch.float32, n=2048, seconds=2.0)
    names = [s for s in SIDES if s != "lmforge_unchunked" or args.with_unchunked]
    sides = {name: make_side(args, device, name) for name in names}
    data = batches(args, args.warmup + args.steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    first_loss: dict[str, float] = {}
    for i, x in enumerate(data):
        # the sides alternate step by step (A B, B A, ...), so load from elsewhere hits them alike
        for side in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            loss = sides[side](x)
            dt = time.perf_counter() - t0
            first_loss.setdefault(side, loss)
            if i >= args.warmup:
                times[side].append(dt)
        if i >= args.warmup and not args.json:
            print(f"step {i - args.warmup + 1}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
                  file=sys.stderr)
    peak = max(peak, measure_matmul_flops(device, torch.float32, n=2048, seconds=2.0))  # best of before/after
    memory: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):  # RSS growth varies a little run to run (allocator arenas): median, alternating
        for side in names:
            memory[side].append(_memory_of(args, side))
    mcfg = model_config(args)
    tokens = args.batch * args.seq
    summary = {"config": {k: getattr(args, k) for k in ("layers", "dim", "heads", "ffn", "vocab", "seq", "batch",
                                                         "micro", "steps", "compile", "loss_chunk")},
               "params": mcfg.num_params(), "flops_per_token": mcfg.flops_per_token(args.seq),
               "fp32_matmul_peak_gflops": peak / 1e9, "threads": torch.get_num_threads()}
    summary["memory_measure"] = ("torch.profiler allocations, one step" if args.memory == "profiler" else
                                 "CUDA max allocated" if device.type == "cuda" else "peak RSS growth (ru_maxrss)")
    for side in names:
        tps = tokens / statistics.median(times[side])
        summary[side] = {"tok_per_s": tps, "mfu": tps * mcfg.flops_per_token(args.seq) / peak,
                         "median_step_s": statistics.median(times[side]),
                         "peak_mem_gb": statistics.median(memory[side]),
                         "first_loss": first_loss[side]}
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
        if "lmforge_unchunked" in summary:
            un = summary["lmforge_unchunked"]
            print(f"lmforge, whole logits (loss_chunk_tokens=0): {un['tok_per_s']:,.0f} tok/s, "
                  f"peak mem +{un['peak_mem_gb']:.2f} GB")
        print(f"ratio lmforge / HF: {summary['ratio']:.2f}x (first-step losses {lm['first_loss']:.4f} vs "
              f"{hf['first_loss']:.4f}); peak memory: {summary['memory_measure']}")
    return 0


def _memory_of(args, side: str) -> float:
    """One fresh-process memory measurement of one side (GB)."""
    cmd = [sys.executable, __file__, "--worker", side] + _pass_through(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode:
        raise SystemExit(f"error: the {side} memory worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_gb"]


def _pass_through(args) -> list[str]:
    out = []
    for k in ("layers", "dim", "heads", "ffn", "vocab", "seq", "batch", "micro", "steps", "warmup", "device",
              "threads", "loss_chunk", "memory"):
        if getattr(args, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.compile:
        out.append("--compile")
    if args.fused is not None:
        out += ["--fused", str(args.fused)]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
