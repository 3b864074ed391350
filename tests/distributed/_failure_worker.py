"""One rank of a 2-rank gloo job whose rank ``victim`` fails at iteration 5 (see test_dist_failure.py).

usage: RANK=.. WORLD_SIZE=2 MASTER_ADDR=.. MASTER_PORT=.. python _failure_worker.py MODE VICTIM TIMEOUT_S
MODE: kill (SIGKILL, like the OOM killer) | raise (a Python exception inside the guard)
"""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from lmforge.distributed.process_group import init_distributed, shutdown_distributed

mode, victim, timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
info = init_distributed(timeout_s=timeout_s, device="cpu")
t = torch.ones(1)
with info.watchdog.guard():
    for i in range(100_000):
        if info.rank == victim and i == 5:
            print(f"victim rank {info.rank} failing now: {time.time():.3f}", file=sys.stderr, flush=True)
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("boom at step 5")
        dist.all_reduce(t)
        time.sleep(0.02)
shutdown_distributed(info)
