"""Training stall per checkpoint: synchronous saves vs `checkpoint.async`, side by side.

One model and AdamW optimizer (the ``small`` preset by default: 8.3M parameters, a ~100 MB checkpoint with
the optimizer state) train on random tokens. Three sides run the same segment — ``--saves`` checkpoints,
``--every`` steps apart, then the wait for the last save — in rotating order (none/sync/async,
sync/async/none, ...), so load from other processes hits them alike; the figures are medians over
``--rounds``:

* blocked: seconds the training thread spent inside ``CheckpointManager.save`` per checkpoint (for async:
  the host copy plus any wait for the save before it);
* overhead: (segment time - the same segment without checkpoints) / saves: what a checkpoint costs the
  run in the end, the background writing's competition for the CPU (and the final wait) included;
* write: the background save's time from the call to LATEST (async only).

Then the hash cost on one of the checkpoints: reading the files back to hash them (what the manifest did
before, `_sha256` per file, warm page cache) against hashing them while DCP writes them (`HashingWriter`:
a DCP save with vs without it, alternated, medians).

    .venv/bin/python bench/checkpoint_stall.py                 # small preset, CPU
    .venv/bin/python bench/checkpoint_stall.py --json out.json
    .venv/bin/python bench/checkpoint_stall.py --storage-mb-per-s 100   # a slow (network) filesystem
    .venv/bin/python bench/checkpoint_stall.py --device cuda --shape tinyllama --seq 1024 --batch 1 \
        --saves 2 --every 4 --rounds 1                         # the GPU part of bench/gpu_check.sh
    .venv/bin/python bench/checkpoint_stall.py --smoke         # tiny shapes on CPU: checks the script itself

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # the ~1.1B shape of bench/gpu_check.py's throughput part (TinyLlama-1.1B's)
    "tinyllama": {"vocab_size": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4,
                  "ffn_hidden": 5632, "max_seq_len": 2048, "activation": "swiglu", "norm": "rmsnorm",
                  "pos_encoding": "rope", "tie_embeddings": False},
    "smoke": {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
              "max_seq_len": 64},
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset (default small)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a fixed shape instead of --preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--saves", type=int, default=4, help="checkpoints per segment")
    p.add_argument("--every", type=int, default=3, help="training steps between checkpoints")
    p.add_argument("--rounds", type=int, default=2, help="segments per side")
    p.add_argument("--hash-repeats", type=int, default=3)
    p.add_argument("--storage-mb-per-s", type=float, default=0.0,
                   help="emulate slower storage: each checkpoint write also sleeps bytes / this rate (0: off)")
    p.add_argument("--dir", help="where checkpoints are written (default: a temp dir; removed after)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and counts (checks the script)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.seq, args.batch, args.saves, args.every, args.rounds = "smoke", 16, 2, 2, 2, 1
        args.device = "cpu"
        args.hash_repeats = 1
    return args


def build(args):
    import torch

    from lmforge.models.presets import get_preset, model_config_from_dict
    from lmforge.models.transformer import build_model
    from lmforge.train.config import OptimConfig
    from lmforge.train.optim import build_optimizer

    cfg = model_config_from_dict(SHAPES[args.shape]) if args.shape else get_preset(args.preset)
    device = torch.device(args.device)
    model = build_model(cfg, seed=0).to(device)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen).to(device) for _ in range(8)]
    state = {"i": 0}

    def step():
        x = data[state["i"] % len(data)]
        state["i"] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return cfg, model, opt, step


def segment(side, args, model, opt, step, root: Path, round_no: int) -> dict:
    from lmforge.train import checkpoint as ckpt

    mgr = None
    if side != "none":
        mgr = ckpt.CheckpointManager(root / f"{side}_{round_no}", keep_last=1, async_save=side == "async")
    blocked, waits, writes = [], [], []
    t0 = time.perf_counter()
    for n in range(1, args.saves + 1):
        for _ in range(args.every):
            step()
        if mgr is not None:
            mgr.save(n, model, opt, {"tokens": n}, {})
            blocked.append(mgr.last_stall_s)
            waits.append(mgr.last_wait_s)
            if mgr.last_write_s is not None:
                writes.append(mgr.last_write_s)
    end_wait = mgr.wait() if mgr is not None else 0.0
    if mgr is not None and mgr.last_write_s is not None:
        writes.append(mgr.last_write_s)
    total = time.perf_counter() - t0
    if mgr is not None:
        shutil.rmtree(mgr.dir, ignore_errors=True)
    return {"total_s": total, "blocked_s": blocked, "wait_s": waits, "end_wait_s": end_wait,
            "write_s": writes}


def hash_cost(args, model, opt, root: Path) -> dict:
    """Read-back hashing (before) vs hashing while writing (after) on the same state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from lmforge.train import checkpoint as ckpt

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd["state"]}
    plain, hashing, readback = [], [], []
    size = 0
    import warnings

    warnings.filterwarnings("ignore", message=".*single process.*")
    for i in range(args.hash_repeats):
        for kind in (("plain", "hashing") if i % 2 == 0 else ("hashing", "plain")):
            d = root / f"hash_{kind}_{i}"
            writer = ckpt.HashingWriter(d) if kind == "hashing" else FileSystemWriter(d)
            t0 = time.perf_counter()
            dcp.save(state, checkpoint_id=str(d), storage_writer=writer)
            (hashing if kind == "hashing" else plain).append(time.perf_counter() - t0)
            if kind == "plain":
                files = [f for f in d.iterdir() if f.is_file()]
                size = sum(f.stat().st_size for f in files)
                t0 = time.perf_counter()
                for f in files:
                    ckpt._sha256(f)
                readback.append(time.perf_counter() - t0)
            shutil.rmtree(d, ignore_errors=True)
    med = statistics.median
    return {"bytes": size, "save_plain_s": med(plain), "save_hashing_s": med(hashing),
            "inline_hash_s": med(hashing) - med(plain), "readback_hash_s": med(readback),
            "readback_MB_per_s": size / 1e6 / med(readback) if med(readback) else None}


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if args.device == "cpu" and not args.smoke:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    _, model, opt, step = build(args)
    real_write = None
    if args.storage_mb_per_s > 0:  # a network filesystem's bandwidth: the write waits (GIL released), no CPU used
        from lmforge.train import checkpoint as ckpt

        real_write, rate = ckpt._HashingStream.write, args.storage_mb_per_s * 1e6

        def slow_write(self, b):
            n = real_write(self, b)
            time.sleep(n / rate)
            return n

        ckpt._HashingStream.write = slow_write
    params = sum(p.numel() for p in model.parameters())
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt_stall_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for _ in range(2):
            step()  # warm-up
        t0 = time.perf_counter()
        step()
        step_s = time.perf_counter() - t0
        sides = ["none", "sync", "async"]
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds):
            order = sides[r % 3:] + sides[: r % 3]
            for side in order:
                results[side].append(segment(side, args, model, opt, step, root, r))
                print(f"round {r + 1} {side}: {results[side][-1]['total_s']:.1f}s", file=sys.stderr, flush=True)
        if args.storage_mb_per_s > 0:  # the hash cost is measured on the real storage
            from lmforge.train import checkpoint as ckpt

            ckpt._HashingStream.write = real_write
        hashes = hash_cost(args, model, opt, root)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    med = statistics.median
    base = med(x["total_s"] for x in results["none"])
    out = {"model": args.shape or args.preset, "storage_mb_per_s": args.storage_mb_per_s or None, "params": params, "device": args.device, "seq": args.seq,
           "batch": args.batch, "saves": args.saves, "every": args.every, "rounds": args.rounds,
           "step_s": step_s, "checkpoint_bytes": hashes["bytes"], "load_avg": os.getloadavg()[0],
           "torch": torch.__version__, "sides": {}, "hash": hashes}
    for side in ("sync", "async"):
        rows = results[side]
        blocked = [b for x in rows for b in x["blocked_s"]]
        out["sides"][side] = {
            "blocked_median_s": med(blocked), "blocked_max_s": max(blocked),
            "wait_median_s": med(w for x in rows for w in x["wait_s"]),
            "end_wait_s": med(x["end_wait_s"] for x in rows),
            "overhead_per_ckpt_s": (med(x["total_s"] for x in rows) - base) / args.saves,
            "write_median_s": med(w for x in rows for w in x["write_s"]) if any(x["write_s"] for x in rows) else None,
        }
    s, a, h = out["sides"]["sync"], out["sides"]["async"], hashes
    print(f"{out['model']} ({params / 1e6:.1f}M params, checkpoint {h['bytes'] / 1e6:.0f} MB) on {args.device}, "
          f"step {step_s:.2f}s, {args.saves} saves every {args.every} steps x {args.rounds} rounds, "
          + (f"storage emulated at {args.storage_mb_per_s:g} MB/s, " if args.storage_mb_per_s else "") +
          f"load {out['load_avg']:.1f}")
    print("| side | blocked per checkpoint (median / max) | overhead per checkpoint | background write |")
    print("|---|---:|---:|---:|")
    print(f"| sync | {s['blocked_median_s']:.3f} / {s['blocked_max_s']:.3f} s | {s['overhead_per_ckpt_s']:.3f} s | - |")
    print(f"| async | {a['blocked_median_s']:.3f} / {a['blocked_max_s']:.3f} s | {a['overhead_per_ckpt_s']:.3f} s "
          f"| {a['write_median_s'] or 0:.3f} s |")
    print(f"hash: read back {h['readback_hash_s']:.3f} s ({h['readback_MB_per_s'] or 0:.0f} MB/s, warm cache); "
          f"while writing {h['inline_hash_s']:+.3f} s on a {h['save_plain_s']:.3f} s DCP save "
          f"({h['save_hashing_s']:.3f} s with hashing)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
