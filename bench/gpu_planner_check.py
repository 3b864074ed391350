"""GPU residuals of the planner (issue 17, item 5): measured peak memory on one GPU beside `lmforge plan`.

Three runs, each two training steps on random tokens (the second is the steady state, with AdamW's
state allocated), measured with `torch.cuda.max_memory_allocated` / `max_memory_reserved` and
`torch.cuda.mem_get_info` (device level, which adds the CUDA context and anything outside PyTorch):

  full1b   TinyLlama-1.1B's shape, FSDP2 on one GPU (bf16 compute, fp32 masters), no AC, seq 2048, mb 4
  full7b   llama2-7b, FSDP2 on one GPU, full activation checkpointing, seq 4096, mb 1
  lora7b   llama2-7b, bf16 base, LoRA r=8 on wq,wv (`lmforge.models.lora.apply_lora`), no AC, seq 4096, mb 1

Each row prints measured and planned allocated / reserved / device GB and the relative errors; the JSON
($OUT/gpu_planner_check.json, or --out) is rewritten after every row, so a run that dies keeps the rows
before it. A run the planner says does not fit this GPU is skipped (recorded, not run); one that runs out of
memory anyway is recorded with the error and the next run goes on. `--smoke` runs tiny shapes on CPU (checks
the script; CPU has no allocator statistics, so only the planner side is printed).

    python bench/gpu_planner_check.py                 # all three, one GPU (H100/H200: ~3-5 min)
    python bench/gpu_planner_check.py --runs lora7b
    python bench/gpu_planner_check.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmforge.distributed.apply import parallelize
from lmforge.distributed.config import ParallelConfig
from lmforge.distributed.process_group import init_distributed, shutdown_distributed
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.models.presets import get_preset, model_config_from_dict
from lmforge.models.transformer import build_model
from lmforge.planner.estimate import PlanRequest, estimate

GB = 1e9
ONE_B = {"vocab_size": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4, "ffn_hidden": 5632, "max_seq_len": 2048,
             "norm_eps": 1e-5, "rope_theta": 10000.0}  # TinyLlama-1.1B's shape
SMOKE = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128, "max_seq_len": 64}
RUNS = {  # name: (model, mode, ac, seq, micro batch)
    "full1b": ("1b", "pretrain", "none", 2048, 4),
    "full7b": ("llama2-7b", "pretrain", "full", 4096, 1),
    "lora7b": ("llama2-7b", "lora", "none", 4096, 1),
}


def _config(name: str, smoke: bool):
    if smoke:
        return model_config_from_dict(SMOKE)
    return model_config_from_dict(ONE_B) if name == "1b" else get_preset(name)


def _measure(cfg, mode: str, ac: str, seq: int, micro: int, device: torch.device) -> dict:
    on_gpu = device.type == "cuda"
    if mode == "lora":  # frozen base in the compute dtype, adapters trained, autocast as the trainer runs
        model = build_model(cfg, device=device, seed=0, dtype=torch.bfloat16 if on_gpu else torch.float32)
        apply_lora(model, LoraConfig(rank=8, targets=["wq", "wv"]))
    else:
        model = build_model(cfg, device=device, seed=0)
        parallelize(model, ParallelConfig(activation_checkpoint=ac, param_dtype="bf16", compile=False), device=device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=on_gpu) if on_gpu else torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (micro, seq + 1), device=device, generator=g)
    out = {}
    for step in range(2):
        if on_gpu:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu and mode == "lora"):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize(device)
            free, total = torch.cuda.mem_get_info(device)
            out = {"allocated": torch.cuda.max_memory_allocated(device) / GB,
                   "reserved": torch.cuda.max_memory_reserved(device) / GB,
                   "outside_allocator": (total - free - torch.cuda.memory_reserved(device)) / GB,
                   "total_device": total / GB}
        out.update(step=step + 1, loss=round(float(loss.detach()), 4), time_s=round(time.perf_counter() - t0, 2))
    del model, opt, tokens, loss
    if on_gpu:
        torch.cuda.empty_cache()
    return out


def _plan(cfg, mode: str, ac: str, seq: int, micro: int, gpu: str, smoke: bool, mem_gb: float | None) -> dict:
    plan = estimate(PlanRequest(model=cfg, model_name="bench", gpus=1, gpu=gpu, gpu_mem_gb=mem_gb, seq_len=seq,
                                micro_batch=micro,
                                ac=ac, mode=mode, device="cpu" if smoke else "cuda",
                                precision="fp32" if smoke else "bf16"))
    return {**plan["memory_peak_gb"], "fits": plan["fits"], "detail": plan["memory_detail_gb"],
            "outside_allocator": plan["memory_detail_gb"]["cuda_context_nccl"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated: {', '.join(RUNS)}")
    p.add_argument("--gpu", default="h100", help="planner GPU preset (peak FLOP/s; memory: --gpu-mem-gb)")
    p.add_argument("--gpu-mem-gb", type=float, default=None,
                   help="memory for the planner's verdict (default: this GPU's, in GiB); rows that do not fit are "
                        "skipped, not run into an out-of-memory error")
    p.add_argument("--out", default=os.environ.get("OUT") or "bench/out")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script only")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        print("error: CUDA is not available; run with --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"error: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # a one-process job (FSDP2 needs a process group)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed(timeout_s=900, device="cpu" if args.smoke else "cuda")
    out = Path(args.out)
    rows: list[dict] = []
    mem_gb = args.gpu_mem_gb
    if mem_gb is None and not args.smoke:  # this GPU's memory in GiB (an "80 GB" H100: 79.2), as gpu_check
        mem_gb = round(torch.cuda.get_device_properties(info.device).total_memory / 2 ** 30, 1)

    def save() -> None:  # after every row: a later run that dies (OOM, timeout) keeps the rows before it
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".gpu_planner_check.json.tmp"
        tmp.write_text(json.dumps({"torch": torch.__version__, "gpu_mem_gb": mem_gb, "rows": rows}, indent=1))
        tmp.replace(out / "gpu_planner_check.json")

    try:
        for name in names:
            model, mode, ac, seq, micro = RUNS[name]
            if args.smoke:
                seq, micro = 32, 2
            cfg = _config(model, args.smoke)
            planned = _plan(cfg, mode, ac, seq, micro, args.gpu, args.smoke, mem_gb)
            row = {"run": name, "model": model, "mode": mode, "ac": ac, "seq_len": seq, "micro_batch": micro,
                   "planner_gb": planned}
            rows.append(row)
            if not planned["fits"] and not args.smoke:
                row["skipped"] = (f"the planner says {planned['device']:.1f} GB does not fit {mem_gb} GB; "
                                  "not run (--gpu-mem-gb to override)")
                print(f"{name}: {row['skipped']}", flush=True)
                save()
                continue
            try:
                measured = _measure(cfg, mode, ac, seq, micro, info.device)
            except torch.cuda.OutOfMemoryError as e:
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"[:300]
                print(f"{name}: {row['error']}", flush=True)
                torch.cuda.empty_cache()
                save()
                continue
            row["measured_gb"] = measured
            for level in ("allocated", "reserved"):
                if level in measured:
                    row[f"error_{level}"] = round(planned[level] / measured[level] - 1, 4)
            save()
            m = " ".join(f"{k} {measured[k]:.2f}" for k in ("allocated", "reserved", "outside_allocator")
                         if k in measured) or "(CPU: no allocator statistics)"
            print(f"{name}: measured {m} | planner allocated {planned['allocated']:.3f} reserved "
                  f"{planned['reserved']:.2f} outside {planned['outside_allocator']:.2f} GB | errors "
                  f"{ {k: v for k, v in row.items() if k.startswith('error_')} }", flush=True)
    finally:
        shutdown_distributed(info)
        save()
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
