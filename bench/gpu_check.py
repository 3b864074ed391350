"""One-GPU checks of the scale-out path (run by bench/gpu_check.sh under torchrun --nproc_per_node 1).

  throughput  a ~1.1B Llama-shaped model (TinyLlama's shape) trained for a few dozen steps with
              FSDP2 bf16 mixed precision and torch.compile per block: tokens/s and MFU against the
              dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM).
  memory7b    one (then a second) training step of the full llama2-7b preset with FSDP2 on one GPU,
              full activation checkpointing, fused AdamW: peak memory beside `lmforge plan`'s prediction.
              The model is built by sharded init (meta device -> FSDP2 -> `to_empty` -> the seeded init
              of the local shards, `lmforge.distributed.materialize`), as `lmforge pretrain` does;
              ``--init full`` builds it whole first (the old path) for comparison.
  write8b     an 8B model dir (llama3-8b, fp32 safetensors, sharded init) plus its logits on fixed tokens.
  load8b      (a fresh process) that model dir loaded through the sharded path (meta -> FSDP2 -> each
              rank reads its slices with safetensors `get_slice`): time, host peak RSS, GPU peak, and the
              logits beside write8b's.

Both use random tokens (no data files) and write one JSON object each to --out. ``--smoke`` runs the
same code on CPU with a tiny model (no compile, no numbers worth reading): a check that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.distributed.apply import parallelize
from lmforge.distributed.config import ParallelConfig
from lmforge.distributed.materialize import ShardedInit, ShardedLoad, attach_weights, materialize
from lmforge.distributed.process_group import init_distributed, shutdown_distributed
from lmforge.models.presets import get_preset, model_config_from_dict
from lmforge.models.transformer import Transformer, build_model

GB = 1e9  # the planner's unit
ONE_B = dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_hidden=5632, max_seq_len=2048,
             norm_eps=1e-5, rope_theta=10000.0)  # TinyLlama-1.1B's shape
SMOKE = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model, lr: float, device: torch.device):
    """Fused AdamW on CUDA (no foreach temporaries the size of the model); plain for-loop otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        try:
            return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True), "fused"
        except (RuntimeError, TypeError, ValueError) as e:
            log(f"note: fused AdamW unavailable here ({e}); using the for-loop implementation")
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=False), "for-loop"


def train_step(model, opt, tokens) -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def mem(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3)}


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def host_peak_gb() -> float:
    """This process's peak resident host memory (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / GB, 2)
    return float("nan")


def build_parallel(cfg, pcfg: ParallelConfig, device: torch.device, source):
    """Meta build -> TP/AC/compile/FSDP2 -> allocate only the local shards -> fill them from ``source``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    attach_weights(model, source)
    parallelize(model, pcfg, device=device)
    materialize(model, device)
    return model


# ---- 1. throughput -------------------------------------------------------------------------------
def throughput(args, device: torch.device) -> dict:
    cfg = model_config_from_dict(SMOKE if args.smoke else ONE_B)
    seq, batch, steps, warmup = (32, 2, 6, 2) if args.smoke else (args.seq_len, args.micro_batch, args.steps, 8)
    pcfg = ParallelConfig(compile=not args.smoke, param_dtype="bf16", activation_checkpoint=args.ac)
    model = build_model(cfg, device=device, seed=0)
    parallelize(model, pcfg, device=device)
    opt, opt_kind = make_optimizer(model, 3e-4, device)
    g = torch.Generator(device=device).manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=g) for _ in range(4)]
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        losses.append(train_step(model, opt, data[step % len(data)]))
        sync(device)
        times.append(time.perf_counter() - t0)
        if step < 3 or (step + 1) % 10 == 0:
            log(f"throughput step {step + 1}/{steps}: loss {losses[-1]:.4f}, {times[-1]:.3f}s")
    steady = times[warmup:] or times
    step_s = statistics.median(steady)
    tok_s = batch * seq / step_s
    flops = cfg.flops_per_token(seq)
    mfu = tok_s * flops / (args.peak_tflops * 1e12)
    planner = {}
    if not args.smoke:  # the planner's memory prediction for this 1.1B shape, beside the measured peak
        from lmforge.config import to_dict

        Path(args.out).mkdir(parents=True, exist_ok=True)
        cfg_path = Path(args.out) / "throughput_model_config.json"
        cfg_path.write_text(json.dumps(to_dict(cfg)))
        planner = {"planner": planner_prediction(str(cfg_path.resolve()), args.gpu, seq, batch, args.ac)}
    return {"check": "throughput", "gpu": gpu_name(device), "params": cfg.num_params(), "seq_len": seq,
            "micro_batch": batch, "steps": steps, "compile": pcfg.compile, "ac": args.ac, "optimizer": opt_kind,
            "first_step_s": round(times[0], 2), "median_step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
            "flops_per_token": flops, "peak_tflops": args.peak_tflops, "mfu": round(mfu, 4),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), **mem(device), **planner}


# ---- 2. 7B memory --------------------------------------------------------------------------------
def planner_prediction(model: str, gpu: str, seq: int, micro: int, ac: str) -> dict:
    """`lmforge plan ... --json` for this exact setting (one GPU, FSDP2, bf16): its memory_gb breakdown."""
    cmd = [sys.executable, "-m", "lmforge", "plan", "--model", model, "--gpus", "1", "--gpu", gpu,
           "--seq-len", str(seq), "--micro-batch", str(micro), "--ac", ac, "--json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])))
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["lmforge plan failed"])[-1]}
    plan = json.loads(out.stdout)
    return {"memory_gb": plan.get("memory_gb"), "fits": plan.get("fits"), "command": " ".join(cmd[3:])}


def memory7b(args, device: torch.device) -> dict:
    cfg = model_config_from_dict(SMOKE) if args.smoke else get_preset(args.preset7b)
    seq = 32 if args.smoke else args.seq_len_7b
    pcfg = ParallelConfig(activation_checkpoint="full", param_dtype="bf16", compile=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if args.init == "sharded":
        model = build_parallel(cfg, pcfg, device, ShardedInit(0))
    else:
        model = build_model(cfg, device=device, seed=0)
        parallelize(model, pcfg, device=device)
    sync(device)
    init_s, init_mem = time.perf_counter() - t0, mem(device)
    opt, opt_kind = make_optimizer(model, 3e-4, device)
    sync(device)
    setup_s = time.perf_counter() - t0
    setup_mem = mem(device)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device, generator=g)
    steps = []
    for i in range(2):  # the first step also allocates AdamW's state; the second is the steady state
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        loss = train_step(model, opt, tokens)
        sync(device)
        steps.append({"step": i + 1, "loss": round(loss, 4), "time_s": round(time.perf_counter() - t0, 3), **mem(device)})
        log(f"7b step {i + 1}: loss {loss:.4f}, {steps[-1]}")
    out = {"check": "memory7b", "gpu": gpu_name(device), "model": "smoke" if args.smoke else args.preset7b,
           "params": cfg.num_params(), "seq_len": seq, "micro_batch": 1, "ac": "full", "fsdp_world": 1,
           "param_dtype": "bf16", "optimizer": opt_kind, "init": args.init, "init_s": round(init_s, 1),
           "after_init": init_mem, "setup_s": round(setup_s, 1), "after_setup": setup_mem,
           "host_peak_gb": host_peak_gb(), "steps": steps}
    if device.type == "cuda":
        out["total_device_gb"] = round(torch.cuda.get_device_properties(device).total_memory / GB, 1)
    if not args.smoke:
        out["planner"] = planner_prediction(args.preset7b, args.gpu, seq, 1, "full")
    return out


# ---- 3. 8B model dir through the sharded loading path ----------------------------------------------
def _probe(cfg, device):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (1, 16), generator=g).to(device)


def _cfg8b(args):
    return model_config_from_dict(SMOKE) if args.smoke else get_preset(args.preset8b)


def write8b(args, device: torch.device) -> dict:
    """Build llama3-8b by sharded init on the GPU, write it as a model dir (fp32), keep its probe logits."""
    from lmforge.artifacts.model_dir import save_model_dir

    cfg = _cfg8b(args)
    pcfg = ParallelConfig(param_dtype="fp32", compile=False)
    t0 = time.perf_counter()
    model = build_parallel(cfg, pcfg, device, ShardedInit(0))
    sync(device)
    init_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(_probe(cfg, device)).float().cpu()
    model_dir = Path(args.out) / "model8b"

    class Full(torch.nn.Module):  # what save_model_dir reads: the config and a full (host) state dict
        def __init__(self):
            super().__init__()
            self.cfg = cfg

        def state_dict(self, *a, **k):
            from torch.distributed.tensor import DTensor

            return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                    for n, p in model.named_parameters()}

    t0 = time.perf_counter()
    save_model_dir(Full(), model_dir)
    write_s = time.perf_counter() - t0
    torch.save(logits, Path(args.out) / "load8b_reference_logits.pt")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"check": "write8b", "gpu": gpu_name(device), "model": "smoke" if args.smoke else args.preset8b,
            "params": cfg.num_params(), "init_s": round(init_s, 1), "write_s": round(write_s, 1),
            "dir_gb": round(size / GB, 2), **mem(device)}


def load8b(args, device: torch.device) -> dict:
    """Load the write8b model dir through the sharded path in this fresh process; compare the logits."""
    cfg = _cfg8b(args)
    model_dir = Path(args.out) / "model8b"
    pcfg = ParallelConfig(param_dtype="fp32", compile=False)
    host_before = host_peak_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_parallel(cfg, pcfg, device, ShardedLoad(model_dir))
    sync(device)
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(_probe(cfg, device)).float().cpu()
    ref = torch.load(Path(args.out) / "load8b_reference_logits.pt", weights_only=True)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"check": "load8b", "gpu": gpu_name(device), "model": "smoke" if args.smoke else args.preset8b,
            "params": cfg.num_params(), "dir_gb": round(size / GB, 2), "load_s": round(load_s, 1),
            "read_gb_per_s": round(size / GB / max(load_s, 1e-9), 2), "host_peak_gb_before": host_before,
            "host_peak_gb": host_peak_gb(), "logits_max_abs_diff": float((logits - ref).abs().max()), **mem(device)}


def summary(out: Path) -> int:
    """Human lines from the JSON files the checks wrote (a missing one is reported, not fatal)."""
    t = out / "throughput.json"
    if t.is_file():
        r = json.loads(t.read_text())
        plan = (r.get("planner") or {}).get("memory_gb") or {}
        print(f"throughput: {r['params'] / 1e9:.2f}B params on {r['gpu']}, {r['micro_batch']}x{r['seq_len']} tokens/step, "
              f"bf16 FSDP2 + compile={r['compile']}, AC {r['ac']}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {r['mfu']:.1%} of {r['peak_tflops']} TFLOP/s (median step {r['median_step_s']}s; first step "
              f"{r['first_step_s']}s incl. compile); loss {r['loss_first']} -> {r['loss_last']}; "
              f"peak allocated {r.get('peak_allocated_gb')} GB, reserved {r.get('peak_reserved_gb')} GB, "
              f"planner {plan.get('total', 'n/a')} GB")
    else:
        print("throughput: no result (see the log)")
    m = out / "memory7b.json"
    if m.is_file():
        r = json.loads(m.read_text())
        last = r["steps"][-1]
        plan = r.get("planner") or {}
        mg = plan.get("memory_gb") or {}
        parts = ", ".join(f"{k} {v}" for k, v in mg.items() if k != "total")
        print(f"memory7b: {r['model']} ({r['params'] / 1e9:.2f}B) on {r['gpu']}, FSDP2 on 1 GPU, bf16, full AC, "
              f"seq {r['seq_len']}: step {last['step']} peak allocated {last.get('peak_allocated_gb')} GB, reserved "
              f"{last.get('peak_reserved_gb')} GB (step 1: {r['steps'][0].get('peak_allocated_gb')} GB) of "
              f"{r.get('total_device_gb')} GB; planner predicts {mg.get('total', plan.get('error', 'n/a'))} GB "
              f"({parts}); step time {last['time_s']}s")
    else:
        print("memory7b: no result (see the log)")
    w, ld = out / "write8b.json", out / "load8b.json"
    if w.is_file() and ld.is_file():
        a, b = json.loads(w.read_text()), json.loads(ld.read_text())
        print(f"load8b: {b['model']} ({b['params'] / 1e9:.2f}B, {b['dir_gb']} GB fp32 safetensors) loaded through "
              f"the sharded path in {b['load_s']}s ({b['read_gb_per_s']} GB/s); host peak {b['host_peak_gb']} GB "
              f"(process start {b['host_peak_gb_before']} GB), GPU peak allocated {b.get('peak_allocated_gb')} GB; "
              f"logits max |diff| vs the written model {b['logits_max_abs_diff']:.2e} (sharded init took "
              f"{a['init_s']}s, writing {a['write_s']}s)")
    else:
        print("load8b: no result (see the log)")
    return 0


def _ac_policy(name: str) -> str:
    from lmforge.config import ConfigError
    from lmforge.distributed.config import parse_ac_policy

    try:
        parse_ac_policy(name)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["throughput", "memory7b", "write8b", "load8b", "summary"])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not the GPU")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ac", default="none", type=_ac_policy,
                   help="parallel.activation_checkpoint: none, full, selective (torchtitan's op SAC), matmuls, layer-N")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200 SXM: 989.4)")
    p.add_argument("--preset7b", default="llama2-7b")
    p.add_argument("--seq-len-7b", type=int, default=4096)
    p.add_argument("--gpu", default="h200", help="planner GPU preset for the prediction")
    p.add_argument("--init", default="sharded", choices=["sharded", "full"], help="memory7b: how the model is built")
    p.add_argument("--preset8b", default="llama3-8b")
    args = p.parse_args()
    if args.check == "summary":
        return summary(Path(args.out))
    if not args.smoke and not torch.cuda.is_available():
        print("error: CUDA is not available; run with --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # not under torchrun: be a one-process job (FSDP2 needs a process group)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed(timeout_s=900, device="cpu" if args.smoke else "cuda")
    device = info.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = {"throughput": throughput, "memory7b": memory7b, "write8b": write8b, "load8b": load8b}[args.check](
            args, device)
    finally:
        shutdown_distributed(info)
    result["torch"] = torch.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.check}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
