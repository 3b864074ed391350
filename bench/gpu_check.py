"""One-GPU checks of the scale-out path (bench/gpu_check.sh runs each part in its own process).

  probe       ~30 s: CUDA visible, a 1-rank NCCL all_reduce, the version-sensitive torch calls lmforge
              makes (DTensor ``_foreach_div_`` as the trainer's gradient scaling does,
              ``distribute_tensor(src_data_rank=None)`` and ``_StridedShard`` as sharded loading does,
              FlexAttention block masks as document masking does on CUDA), and the bf16 matmul rate.
              Writes probe.json; exits 3 naming the first required call that failed.
  throughput  a ~1.1B Llama-shaped model (TinyLlama's shape), FSDP2 bf16 mixed precision and torch.compile
              per block: tokens/s and MFU against the dense bf16 peak (989.4 TFLOP/s for H100/H200 SXM).
  memory      the largest model the planner says fits this GPU for a full fine-tune (FSDP2 on one GPU,
              fp32 master weights and AdamW state, bf16 compute, full activation checkpointing): a 7B/8B
              preset only where `lmforge plan` says it fits (an H200), else OpenLLaMA-3B's shape (an H100),
              else the 1.1B shape. Built by sharded init (meta -> FSDP2 -> local shards), two steps: peak
              memory beside the planner's prediction. memory.json is rewritten after every step, so an
              out-of-memory step keeps what came before.
  write8b     an 8B model dir (llama3-8b, bf16 safetensors, ~16 GB, built by sharded init) and its logits on
              fixed tokens.
  load8b      (a fresh process) that dir loaded through the sharded path into bf16 DTensors (meta -> FSDP2
              -> each rank reads its slices with safetensors ``get_slice``): time, host peak, GPU peak, and
              the logits beside write8b's.

Random tokens, no data files; each part writes its JSON to --out as it finishes. ``--smoke`` runs the same
code on CPU (gloo, tiny shapes, no compile): a check that the script works, not numbers worth reading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
GIB = 2 ** 30
ONE_B = {"vocab_size": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "ffn_hidden": 5632, "max_seq_len": 2048,
             "norm_eps": 1e-5, "rope_theta": 10000.0}  # TinyLlama-1.1B's shape
THREE_B = {"vocab_size": 32000, "dim": 3200, "n_layers": 26, "n_heads": 32, "n_kv_heads": 32, "ffn_hidden": 8640,
               "max_seq_len": 4096, "norm_eps": 1e-6, "rope_theta": 10000.0}  # OpenLLaMA-3B's shape
SMOKE = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128, "max_seq_len": 64}
# memory: largest first; the first the planner says fits this GPU is run
MEMORY_CANDIDATES = ("llama3-8b", "llama2-7b", "3b", "1b")
SHAPES = {"3b": THREE_B, "1b": ONE_B, "smoke": SMOKE}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_cfg(name: str):
    return model_config_from_dict(SHAPES[name]) if name in SHAPES else get_preset(name)


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
    """One step with lmforge's own loss (chunked LM head inside the model's forward), as the trainer runs."""
    from lmforge.train.losses import next_token_loss

    targets = tokens[:, 1:]
    loss = next_token_loss(model, tokens[:, :-1], targets) / targets.numel()
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


def device_memory_gb(device: torch.device) -> float:
    """What the planner should take as this GPU's memory: the device's total in GiB (an "80 GB" H100
    reports 85.0e9 bytes = 79.2 GiB, close to the planner's own 80 GB label, which leaves the same room)."""
    if device.type != "cuda":
        return 8.0  # smoke: a nominal figure, only for the planner call
    return round(torch.cuda.get_device_properties(device).total_memory / GIB, 1)


def host_peak_gb() -> float:
    """This process's peak resident host memory (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / GB, 2)
    return float("nan")


def write_json(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(dict(result, torch=torch.__version__), indent=1))
    tmp.replace(out / f"{name}.json")


def build_parallel(cfg, pcfg: ParallelConfig, device: torch.device, source, dtype=torch.float32):
    """Meta build -> TP/AC/compile/FSDP2 -> allocate only the local shards -> fill them from ``source``."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    attach_weights(model, source)
    parallelize(model, pcfg, device=device)
    materialize(model, device)
    return model


def plan(cfg, name: str, mem_gb: float, seq: int, micro: int, ac: str, smoke: bool) -> dict:
    """`lmforge plan --model NAME --gpus 1 --gpu-mem-gb MEM --seq-len SEQ --micro-batch MICRO --ac AC`:
    the planner's memory for this exact setting (one GPU, FSDP2, bf16 compute, fp32 AdamW)."""
    from lmforge.planner.estimate import PlanRequest, estimate

    try:
        p = estimate(PlanRequest(model=cfg, model_name=name, gpus=1, gpu_mem_gb=mem_gb, seq_len=seq,
                                 micro_batch=micro, ac=ac, device="cpu" if smoke else "cuda",
                                 precision="fp32" if smoke else "bf16"))
    except Exception as e:  # noqa: BLE001 - the check reports the planner's failure beside the measurement
        return {"error": f"{type(e).__name__}: {e}"}
    return {"memory_gb": p["memory_gb"], "memory_peak_gb": p["memory_peak_gb"], "fits": p["fits"],
            "gpu_mem_gb": mem_gb, "command": f"lmforge plan --model {name} --gpus 1 --gpu-mem-gb {mem_gb} "
                                             f"--seq-len {seq} --micro-batch {micro} --ac {ac}"}


# ---- 0. probe ----------------------------------------------------------------------------------------
def probe(args, device: torch.device) -> dict:
    """Each version-sensitive call once, small; ``required`` ones stop the check when they fail."""
    import torch.distributed as dist

    checks: list[dict] = []

    def check(name: str, required: bool, fn) -> None:
        t0 = time.perf_counter()
        try:
            if name in os.environ.get("GPU_CHECK_FAIL", "").split(","):  # how the smoke test makes a check fail
                raise RuntimeError("failed on purpose (GPU_CHECK_FAIL)")
            detail = fn()
            checks.append({"name": name, "ok": True, "required": required, "detail": detail,
                           "s": round(time.perf_counter() - t0, 2)})
        except Exception as e:  # noqa: BLE001 - every failure is reported by name
            checks.append({"name": name, "ok": False, "required": required,
                           "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        log(f"probe {name}: {'ok' if checks[-1]['ok'] else 'FAILED ' + checks[-1]['error']}")

    def all_reduce():
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        assert float(t.sum()) == 4.0 * dist.get_world_size(), t
        return f"{dist.get_backend()} world {dist.get_world_size()}"

    def mesh():
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device.type, (dist.get_world_size(),))

    def foreach_div():  # the trainer's per-target gradient scaling: DTensors divided by a 0-dim tensor
        from torch.distributed.tensor import Shard, distribute_tensor

        m = mesh()
        grads = [distribute_tensor(torch.full((8, 4), 6.0, device=device), m, [Shard(0)]) for _ in range(2)]
        torch._foreach_div_(grads, torch.tensor(3.0).to(grads[0].device, grads[0].dtype))
        assert all(float(g.to_local().max()) == 2.0 for g in grads)
        return "ok"

    def src_data_rank():  # lmforge.distributed.materialize: index maps without communication
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.distributed.tensor.placement_types import _StridedShard  # noqa: F401

        idx = distribute_tensor(torch.arange(8), mesh(), [Shard(0)], src_data_rank=None)
        assert idx.to_local().numel() == 8 // dist.get_world_size()
        return "ok"

    def flex():  # document masks on CUDA (lmforge.models.masks): the API, eager (tests/gpu runs the compiled kernel)
        import warnings

        from torch.nn.attention.flex_attention import flex_attention

        from lmforge.models.masks import document_block_mask, document_mask_dense

        doc = torch.tensor([[0] * 70 + [1] * 58], device=device)
        q = torch.randn(1, 4, 128, 16, device=device, requires_grad=device.type == "cuda")
        k, v = torch.randn(1, 2, 128, 16, device=device), torch.randn(1, 2, 128, 16, device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = flex_attention(q, k, v, block_mask=document_block_mask(doc, causal=True, compile=False),
                                 enable_gqa=True)
        dense = document_mask_dense(doc)[:, :, :, :] & torch.ones(128, 128, dtype=torch.bool, device=device).tril()
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
        diff = float((got - want).abs().max())
        assert diff < 1e-2, diff
        if q.requires_grad:  # no CPU backward in torch; CUDA must have it
            got.sum().backward()
            assert q.grad is not None and bool(torch.isfinite(q.grad).all())
        return f"max |flex - sdpa| {diff:.1e}"

    def matmul():
        n, dtype = (256, torch.float32) if device.type != "cuda" else (8192, torch.bfloat16)
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        reps, t0 = (5 if device.type != "cuda" else 50), time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        tflops = 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12
        return {"dtype": str(dtype).removeprefix("torch."), "n": n, "tflops": round(tflops, 3)}

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "device": gpu_name(device), "memory_gb": device_memory_gb(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    check("all_reduce", True, all_reduce)
    check("dtensor_foreach_div", True, foreach_div)
    check("distribute_tensor_src_data_rank", True, src_data_rank)
    check("flex_attention", False, flex)
    check("matmul", True, matmul)
    failed = [c for c in checks if not c["ok"] and c["required"]]
    return {"check": "probe", **info, "checks": checks, "ok": not failed,
            "failed": [c["name"] for c in failed]}


# ---- 1. throughput -------------------------------------------------------------------------------
def throughput(args, device: torch.device) -> dict:
    cfg = model_config_from_dict(SMOKE if args.smoke else ONE_B)
    seq, batch, steps, warmup = (32, 2, 6, 2) if args.smoke else (args.seq_len, args.micro_batch, args.steps, 8)
    pcfg = ParallelConfig(compile=not args.smoke, param_dtype="fp32" if args.smoke else "bf16",
                          activation_checkpoint=args.ac)
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
    return {"check": "throughput", "gpu": gpu_name(device), "params": cfg.num_params(), "seq_len": seq,
            "micro_batch": batch, "steps": steps, "compile": pcfg.compile, "ac": args.ac, "optimizer": opt_kind,
            "first_step_s": round(times[0], 2), "median_step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1),
            "flops_per_token": flops, "peak_tflops": args.peak_tflops, "mfu": round(mfu, 4),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), **mem(device),
            "planner": plan(cfg, "1b", device_memory_gb(device), seq, batch, args.ac, args.smoke)}


# ---- 2. peak memory of the largest model that fits ------------------------------------------------
def pick_memory_model(mem_gb: float, seq: int, smoke: bool) -> tuple[str, dict, list[dict]]:
    """(name, plan, every candidate's verdict): the first of MEMORY_CANDIDATES the planner says fits."""
    if smoke:
        cfg = model_cfg("smoke")
        return "smoke", plan(cfg, "smoke", mem_gb, 32, 1, "full", True), []
    tried = []
    for name in MEMORY_CANDIDATES:
        cfg = model_cfg(name)
        p = plan(cfg, name, mem_gb, min(seq, cfg.max_seq_len), 1, "full", False)
        tried.append({"model": name, "fits": p.get("fits"),
                      "planned_device_gb": (p.get("memory_peak_gb") or {}).get("device"), "error": p.get("error")})
        if p.get("fits"):
            return name, p, tried
    return "", {}, tried


def memory(args, device: torch.device) -> dict:
    out_dir = Path(args.out)
    mem_gb = device_memory_gb(device)
    seq = 32 if args.smoke else args.seq_len_7b
    name, planned, tried = (args.memory_model, None, []) if args.memory_model else (None, None, None)
    if name is None:
        name, planned, tried = pick_memory_model(mem_gb, seq, args.smoke)
    if not name:
        raise SystemExit(f"memory: no candidate ({', '.join(MEMORY_CANDIDATES)}) fits {mem_gb} GB by the planner")
    cfg = model_cfg(name)
    seq = min(seq, cfg.max_seq_len)
    result_seq_note = None if seq == args.seq_len_7b or args.smoke else f"the model's max_seq_len {seq}"
    if planned is None:
        planned = plan(cfg, name, mem_gb, seq, 1, "full", args.smoke)
    pcfg = ParallelConfig(activation_checkpoint="full", param_dtype="fp32" if args.smoke else "bf16", compile=False)
    result = {"check": "memory", "gpu": gpu_name(device), "model": name, "params": cfg.num_params(), "seq_len": seq,
              "micro_batch": 1, "ac": "full", "fsdp_world": 1, "param_dtype": pcfg.param_dtype,
              "device_memory_gb": mem_gb, "candidates": tried, "planner": planned, "steps": [],
              "seq_len_note": result_seq_note}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_parallel(cfg, pcfg, device, ShardedInit(0))
    opt, opt_kind = make_optimizer(model, 3e-4, device)
    sync(device)
    result.update(optimizer=opt_kind, setup_s=round(time.perf_counter() - t0, 1), after_setup=mem(device),
                  host_peak_gb=host_peak_gb())
    write_json(out_dir, "memory", result)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq + 1), device=device, generator=g)
    for i in range(2):  # the first step also allocates AdamW's state; the second is the steady state
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            loss = train_step(model, opt, tokens)
        except torch.cuda.OutOfMemoryError as e:
            result["steps"].append({"step": i + 1, "error": f"out of memory: {str(e).splitlines()[0]}"[:300],
                                    **mem(device)})
            write_json(out_dir, "memory", result)
            raise SystemExit(f"memory: step {i + 1} ran out of memory (planner said it fits: {planned.get('fits')})")
        sync(device)
        result["steps"].append({"step": i + 1, "loss": round(loss, 4), "time_s": round(time.perf_counter() - t0, 3),
                                **mem(device)})
        write_json(out_dir, "memory", result)
        log(f"memory {name} step {i + 1}: {result['steps'][-1]}")
    return result


# ---- 3. 8B model dir through the sharded loading path ----------------------------------------------
def _probe_tokens(cfg, device):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (1, 16), generator=g).to(device)


def _cfg8b(args):
    return model_cfg("smoke") if args.smoke else get_preset(args.preset8b)


def _dtype8b(args):
    return torch.float32 if args.smoke else torch.bfloat16


def write8b(args, device: torch.device) -> dict:
    """Build llama3-8b by sharded init on the GPU in bf16, write it as a model dir, keep its probe logits."""
    from torch.distributed.tensor import DTensor

    from lmforge.artifacts.model_dir import save_model_dir

    cfg = _cfg8b(args)
    pcfg = ParallelConfig(param_dtype="fp32" if args.smoke else "bf16", compile=False)
    t0 = time.perf_counter()
    model = build_parallel(cfg, pcfg, device, ShardedInit(0), dtype=_dtype8b(args))
    sync(device)
    init_s = time.perf_counter() - t0
    with torch.no_grad():
        logits = model(_probe_tokens(cfg, device)).float().cpu()
    model_dir = Path(args.out) / "model8b"

    class Full(torch.nn.Module):  # what save_model_dir reads: the config and a full (host) state dict
        def __init__(self):
            super().__init__()
            self.cfg = cfg

        def state_dict(self, *a, **k):
            return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                    for n, p in model.named_parameters()}

    t0 = time.perf_counter()
    save_model_dir(Full(), model_dir)
    write_s = time.perf_counter() - t0
    torch.save(logits, Path(args.out) / "load8b_reference_logits.pt")
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"check": "write8b", "gpu": gpu_name(device), "model": "smoke" if args.smoke else args.preset8b,
            "dtype": str(_dtype8b(args)).removeprefix("torch."), "params": cfg.num_params(),
            "init_s": round(init_s, 1), "write_s": round(write_s, 1), "dir_gb": round(size / GB, 2), **mem(device)}


def load8b(args, device: torch.device) -> dict:
    """Load the write8b model dir through the sharded path in this fresh process; compare the logits."""
    from torch.distributed.tensor import DTensor

    cfg = _cfg8b(args)
    model_dir = Path(args.out) / "model8b"
    pcfg = ParallelConfig(param_dtype="fp32" if args.smoke else "bf16", compile=False)
    host_before = host_peak_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_parallel(cfg, pcfg, device, ShardedLoad(model_dir), dtype=_dtype8b(args))
    sync(device)
    load_s = time.perf_counter() - t0
    params = list(model.parameters())
    with torch.no_grad():
        logits = model(_probe_tokens(cfg, device)).float().cpu()
    ref = torch.load(Path(args.out) / "load8b_reference_logits.pt", weights_only=True)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return {"check": "load8b", "gpu": gpu_name(device), "model": "smoke" if args.smoke else args.preset8b,
            "dtype": str(params[0].dtype).removeprefix("torch."),
            "all_dtensor": all(isinstance(p, DTensor) for p in params), "params": cfg.num_params(),
            "dir_gb": round(size / GB, 2), "load_s": round(load_s, 1),
            "read_gb_per_s": round(size / GB / max(load_s, 1e-9), 2), "host_peak_gb_before": host_before,
            "host_peak_gb": host_peak_gb(), "logits_max_abs_diff": float((logits - ref).abs().max()), **mem(device)}


# ---- summary ---------------------------------------------------------------------------------------
def _read(out: Path, name: str) -> dict | None:
    f = out / f"{name}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def summary(out: Path) -> int:
    """Human lines from the JSON files the parts wrote (a missing one is reported, not fatal)."""
    r = _read(out, "probe")
    if r:
        mm = next((c.get("detail") for c in r["checks"] if c["name"] == "matmul" and c["ok"]), None) or {}
        bad = [f"{c['name']} ({c['error']})" for c in r["checks"] if not c["ok"]]
        print(f"probe: {r['device']} ({r['memory_gb']} GiB), torch {r['torch']}, CUDA {r['cuda']}, python "
              f"{r['python']}: {'ok' if r['ok'] else 'FAILED'}; matmul {mm.get('dtype')} {mm.get('tflops')} TFLOP/s"
              + (f"; failed: {'; '.join(bad)}" if bad else ""))
    else:
        print("probe: no result (see the log)")
    r = _read(out, "throughput")
    if r:
        pl = (r.get("planner") or {}).get("memory_peak_gb") or {}
        print(f"throughput: {r['params'] / 1e9:.2f}B params on {r['gpu']}, {r['micro_batch']}x{r['seq_len']} tokens/step, "
              f"FSDP2 + compile={r['compile']}, AC {r['ac']}: {r['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {r['mfu']:.1%} of {r['peak_tflops']} TFLOP/s (median step {r['median_step_s']}s; first step "
              f"{r['first_step_s']}s incl. compile); loss {r['loss_first']} -> {r['loss_last']}; "
              f"peak allocated {r.get('peak_allocated_gb')} GB, reserved {r.get('peak_reserved_gb')} GB; "
              f"planner allocated {pl.get('allocated', 'n/a')} GB, reserved {pl.get('reserved', 'n/a')} GB")
    else:
        print("throughput: no result (see the log)")
    r = _read(out, "memory")
    if r:
        pl = r.get("planner") or {}
        peak = pl.get("memory_peak_gb") or {}
        steps = r.get("steps") or []
        last = steps[-1] if steps else {}
        skipped = ", ".join(f"{c['model']} (planned {c['planned_device_gb']} GB)" for c in r.get("candidates") or []
                            if not c.get("fits"))
        print(f"memory: {r['model']} ({r['params'] / 1e9:.2f}B) on {r['gpu']}, FSDP2 on 1 GPU, fp32 AdamW, "
              f"{r['param_dtype']} compute, full AC, seq {r['seq_len']}: "
              + (f"step {last.get('step')} peak allocated {last.get('peak_allocated_gb')} GB, reserved "
                 f"{last.get('peak_reserved_gb')} GB" if last and "error" not in last else
                 f"{last.get('error', 'no step finished')}")
              + f"; planner allocated {peak.get('allocated', 'n/a')} GB, reserved {peak.get('reserved', 'n/a')} GB,"
              f" device {peak.get('device', pl.get('error', 'n/a'))} GB of {r.get('device_memory_gb')} GiB"
              + (f"; not fitting by the planner: {skipped}" if skipped else ""))
    else:
        print("memory: no result (see the log)")
    a, b = _read(out, "write8b"), _read(out, "load8b")
    if a and b:
        print(f"load8b: {b['model']} ({b['params'] / 1e9:.2f}B, {b['dir_gb']} GB {b['dtype']} safetensors) loaded "
              f"through the sharded path into DTensors={b['all_dtensor']} in {b['load_s']}s ({b['read_gb_per_s']} "
              f"GB/s); host peak {b['host_peak_gb']} GB (process start {b['host_peak_gb_before']} GB), GPU peak "
              f"allocated {b.get('peak_allocated_gb')} GB; logits max |diff| vs the written model "
              f"{b['logits_max_abs_diff']:.2e} (sharded init took {a['init_s']}s, writing {a['write_s']}s)")
    else:
        print("load8b: no result (see the log)")
    r = _read(out, "gpu_planner_check")
    if r:
        for row in r["rows"]:
            print(f"planner-check {row['run']}: " + json.dumps({k: row[k] for k in row if k.startswith(("error", "skip"))
                                                                 or k == "measured_gb"}))
    return 0


def _ac_policy(name: str) -> str:
    from lmforge.config import ConfigError
    from lmforge.distributed.config import parse_ac_policy

    try:
        parse_ac_policy(name)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


PARTS = {"probe": probe, "throughput": throughput, "memory": memory, "write8b": write8b, "load8b": load8b}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=[*PARTS, "memory7b", "summary"])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not the GPU")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ac", default="none", type=_ac_policy,
                   help="parallel.activation_checkpoint: none, full, selective (torchtitan's op SAC), matmuls, layer-N")
    p.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak (H100/H200 SXM: 989.4)")
    p.add_argument("--seq-len-7b", type=int, default=4096, help="memory: sequence length")
    p.add_argument("--memory-model", default=None,
                   help=f"memory: run this model ({', '.join(MEMORY_CANDIDATES)} or a preset) instead of the "
                        "planner's pick")
    p.add_argument("--preset8b", default="llama3-8b")
    args = p.parse_args()
    if args.check == "memory7b":  # the old name of the part
        args.check = "memory"
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
    info = init_distributed(timeout_s=300, device="cpu" if args.smoke else "cuda")
    device = info.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        result = PARTS[args.check](args, device)
    finally:
        shutdown_distributed(info)
    write_json(Path(args.out), args.check, result)
    print(json.dumps(result), flush=True)
    if args.check == "probe" and not result["ok"]:
        failed = [c for c in result["checks"] if c["name"] in result["failed"]]
        print(f"probe FAILED: {'; '.join(c['name'] + ': ' + c['error'] for c in failed)} (torch {torch.__version__})",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
