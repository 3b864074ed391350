"""What Muon's optimizer step costs next to AdamW's, in one process and under FSDP2 (gather approach).

One process: the same model and the same real gradients (one forward/backward of a random batch);
AdamW's step and Muon's step alternate (A B, B A, ...) so load from other processes hits both alike;
medians. The Newton–Schulz share of Muon's step is timed separately. For scale, one forward/backward of
the micro-batch is timed too.

``--ranks N`` (CPU, gloo): the model is sharded with FSDP2 over N spawned ranks; ``--ns-work split``
gathers each Muon matrix on its owner rank, which orthogonalizes it and scatters the slices back;
``replicate`` gathers every matrix on every rank (``full_tensor()``). Printed (rank 0): the step times,
Newton–Schulz's share, and the rest of the orthogonalization (gather, scatter, waiting for the owner).

Memory: optimizer state per parameter (AdamW 2 fp32 tensors; Muon 1 for the matrices) is counted from
the optimizers' state; the gather's transient is one full matrix plus Newton–Schulz's temporaries at a
time (largest matrix printed); on CUDA the measured peak over a step is printed too.

    .venv/bin/python bench/muon_step.py                       # preset small, 1 process
    .venv/bin/python bench/muon_step.py --preset gpt2-124m --ranks 2
    .venv/bin/python bench/muon_step.py --json

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Timed:
    """Wraps a function of ``lmforge.train.muon`` and sums the seconds spent in it."""

    def __init__(self, module, name: str, sync):
        self.module, self.name, self.sync = module, name, sync
        self.fn = getattr(module, name)
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out

    def __enter__(self):
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.fn)


def build(args, device):
    import torch

    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    return build_model(cfg, device=device, seed=0), cfg


def real_grads(model, cfg, args, device):
    """One forward/backward of a random batch; returns its seconds (the scale for the step times)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device)
    times = []
    for _ in range(2):  # the first warms up
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[-1]


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def optimizers(model, args):
    from lmforge.train.config import OptimConfig
    from lmforge.train.optim import build_optimizer

    adamw = build_optimizer(model, OptimConfig(name="adamw", lr=1e-6))
    muon = build_optimizer(model, OptimConfig(name="muon", lr=1e-6, muon_ns_dtype=args.ns_dtype,
                                              muon_ns_work=args.ns_work))
    return {"adamw": adamw, "muon": muon}


def time_steps(opts, device, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of each optimizer (alternating order), and Muon's NS and gather seconds
    per step."""
    import lmforge.train.muon as muon_mod

    names = list(opts)
    times: dict[str, list[float]] = {n: [] for n in names}
    with Timed(muon_mod, "newton_schulz", lambda: sync(device)) as ns, \
            Timed(muon_mod, "orthogonalize", lambda: sync(device)) as orth:
        for name in names:  # warm-up: state allocation
            opts[name].step()
        ns.seconds = orth.seconds = 0.0
        for i in range(steps):
            for name in (names if i % 2 == 0 else names[::-1]):
                sync(device)
                t0 = time.perf_counter()
                opts[name].step()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    # orthogonalize = gather + Newton–Schulz + scatter (+ waiting for the owner rank): the rest is traffic
    parts = {"newton_schulz_s": ns.seconds / steps, "gather_scatter_s": (orth.seconds - ns.seconds) / steps}
    return {n: statistics.median(t) for n, t in times.items()}, parts


def state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if hasattr(v, "numel") and v.ndim > 0:
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def largest_matrix(model) -> tuple[tuple[int, int], int]:
    from lmforge.train.optim import muon_matrices

    ids = muon_matrices(model)
    shapes = [tuple(p.shape) for p in model.parameters() if id(p) in ids]
    big = max(shapes, key=lambda s: s[0] * s[1])
    return big, big[0] * big[1] * 4


def cuda_peak_step(opt, device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def one_process(args) -> dict:
    import torch

    device = torch.device(args.device)
    torch.set_num_threads(args.threads) if args.threads else None
    model, cfg = build(args, device)
    fwd_bwd = real_grads(model, cfg, args, device)
    opts = optimizers(model, args)
    med, parts = time_steps(opts, device, args.steps)
    shape, nbytes = largest_matrix(model)
    return {"mode": "1 process", "device": str(device), "preset": args.preset, "params": cfg.num_params(),
            "fwd_bwd_s": fwd_bwd, "adamw_step_s": med["adamw"], "muon_step_s": med["muon"],
            "muon_over_adamw": med["muon"] / med["adamw"], **parts,
            "adamw_state_mb": state_bytes(opts["adamw"]) / 1e6, "muon_state_mb": state_bytes(opts["muon"]) / 1e6,
            "largest_matrix": list(shape), "largest_matrix_fp32_mb": nbytes / 1e6,
            "cuda_step_peak_megabytes": {n: cuda_peak_step(o, device) for n, o in opts.items()}}


def _rank(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import world_for

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cpu")
        model, cfg = build(args, device)
        pcfg = ParallelConfig(dp_shard=world)
        parallelize(model, pcfg, world_for(pcfg, device), device=device)
        fwd_bwd = real_grads(model, cfg, args, device)
        opts = optimizers(model, args)
        med, parts = time_steps(opts, device, args.steps)
        if rank == 0:
            shape, nbytes = largest_matrix(model)
            Path(out).write_text(json.dumps({
                "mode": f"FSDP2 x{world} (gloo, CPU, muon_ns_work={args.ns_work})", "device": "cpu", "preset": args.preset,
                "params": cfg.num_params(), "fwd_bwd_s": fwd_bwd, "adamw_step_s": med["adamw"],
                "muon_step_s": med["muon"], "muon_over_adamw": med["muon"] / med["adamw"], **parts,
                "adamw_state_mb_per_rank": state_bytes(opts["adamw"]) / 1e6,
                "muon_state_mb_per_rank": state_bytes(opts["muon"]) / 1e6,
                "largest_matrix": list(shape), "largest_matrix_fp32_mb": nbytes / 1e6}))
    finally:
        dist.destroy_process_group()


def sharded(args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "result.json")
        mp.start_processes(_rank, args=(args.ranks, port, args, out), nprocs=args.ranks, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ranks", type=int, default=1, help="FSDP2 over this many gloo ranks (CPU)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ns-dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--ns-work", default="split", choices=["split", "replicate"],
                   help="sharded matrices: Newton-Schulz on one owner rank each, or on every rank")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = one_process(args) if args.ranks == 1 else sharded(args)
    if args.json:
        print(json.dumps(r))
        return
    print(f"{r['mode']}, {r['preset']} ({r['params']:,} params) on {r['device']}: forward+backward "
          f"{r['fwd_bwd_s'] * 1e3:.0f} ms (batch {args.batch}x{args.seq})")
    print(f"  optimizer step: AdamW {r['adamw_step_s'] * 1e3:.1f} ms, Muon {r['muon_step_s'] * 1e3:.1f} ms "
          f"({r['muon_over_adamw']:.2f}x; Newton-Schulz {r['newton_schulz_s'] * 1e3:.1f} ms, gather/scatter "
          f"and waiting {r['gather_scatter_s'] * 1e3:.1f} ms per step)")
    state = {k: v for k, v in r.items() if k.endswith(("_mb", "_mb_per_rank"))}
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in state.items()) + f"; largest matrix {r['largest_matrix']}")
    if r.get("cuda_step_peak_megabytes"):
        print(f"  CUDA peak over a step (MB above the resident state): {r['cuda_step_peak_megabytes']}")


if __name__ == "__main__":
    main()
