"""Spawned-rank jobs for the async-checkpoint tests (imported by the children as "_async_ckpt_jobs:NAME")."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import _dist_harness as h


@contextlib.contextmanager
def slow_rank1_writes(rank: int, log: Path, delay: float):
    """Rank 1's background shard writing takes ``delay`` s longer; log when each rank's shards are written
    and when (and by whom) LATEST is replaced."""
    from lmforge.train import checkpoint as ckpt

    real_write, real_text = ckpt.HashingWriter.write_data, ckpt.atomic_write_text

    def note(event):
        with open(log, "a") as f:
            f.write(json.dumps({"event": event, "rank": rank, "t": time.time()}) + "\n")

    def write_data(self, plan, planner):
        if rank == 1:
            time.sleep(delay)
        out = real_write(self, plan, planner)
        note("shards_done")
        return out

    def text(path, content):
        real_text(path, content)
        if Path(path).name == ckpt.LATEST:
            note("latest")

    ckpt.HashingWriter.write_data, ckpt.atomic_write_text = write_data, text
    try:
        yield
    finally:
        ckpt.HashingWriter.write_data, ckpt.atomic_write_text = real_write, real_text


def async_runs(info, root: str, data_dir: str, half: int, steps: int) -> None:
    """2 ranks, FSDP2, checkpoint.async: the first half (rank 1's writes slowed), then a 2 -> 2 resume."""
    import torch.distributed as dist

    from lmforge.distributed.world import setup_world

    root = Path(root)
    section = {"async": True, "interval": 1, "keep_last": 5}
    world, device = setup_world("cpu", h._pcfg({"dp_shard": 2}))
    with slow_rank1_writes(info.rank, root / f"probe_rank{info.rank}.jsonl", 0.5):
        h.run_trainer(root / "two_async", data_dir, half, {"dp_shard": 2}, world=world, device=device,
                      checkpoint=section)
    dist.barrier()
    if info.rank == 0:
        shutil.copytree(root / "two_async", root / "two_two_async")
    dist.barrier()
    h.run_trainer(root / "two_two_async", data_dir, steps, {"dp_shard": 2}, world=world, device=device,
                  checkpoint=section)
    dist.barrier()
