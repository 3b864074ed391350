"""One rank of `lmforge CMD ...` through the real CLI, with an optional test hook (see test_trainer_stop.py).

usage: python _trainer_cli_worker.py pretrain --config CFG [overrides]   (RANK, WORLD_SIZE, MASTER_* set)
LMFORGE_TEST_HOOK="KIND:RANK:STEP" acts on rank RANK just before it trains step STEP + 1:
  SIGTERM / SIGINT  the rank sends itself that signal (one rank only: the others never see it)
  clock             the rank's clock jumps ahead by a day (it alone reaches train.time_limit_minutes)
LMFORGE_TEST_HOOK="loss:RANK:STEP:FACTOR" scales rank RANK's loss by FACTOR while it trains step STEP + 1
  (a loss spike that one rank alone sees); "loss:RANK:STEP+:FACTOR" does so at every step from STEP + 1 on.
LMFORGE_TEST_RECORD=DIR: every rank appends the global window ids of each training batch it reads to
  DIR/windows_rank<r>.jsonl (the format of `_dist_harness.RecordingSource`).
"""

import os
import signal
import sys

from lmforge import cli
from lmforge.train import trainer as trainer_mod

hook = os.environ.get("LMFORGE_TEST_HOOK")
if hook and hook.startswith("loss:"):
    _, rank, step, factor = hook.split(":")
    rank, every, step, factor = int(rank), step.endswith("+"), int(step.rstrip("+")), float(factor)
    original_step = trainer_mod.Trainer.train_step

    def train_step(self, batch):
        if self.world.rank == rank and (self.step >= step if every else self.step == step):
            loss_fn = self.loss_fn

            def scaled(model, b):
                loss, n = loss_fn(model, b)
                return loss * factor, n

            self.loss_fn = scaled
            try:
                return original_step(self, batch)
            finally:
                self.loss_fn = loss_fn
        return original_step(self, batch)

    trainer_mod.Trainer.train_step = train_step
elif hook:
    kind, rank, step = hook.split(":")
    rank, step = int(rank), int(step)
    original_step, real_now = trainer_mod.Trainer.train_step, trainer_mod.now
    skew = [0.0]

    def train_step(self, batch):
        if self.world.rank == rank and self.step == step:
            if kind == "clock":
                skew[0] = 86400.0
            else:
                os.kill(os.getpid(), getattr(signal, kind))
        return original_step(self, batch)

    trainer_mod.Trainer.train_step = train_step
    trainer_mod.now = lambda: real_now() + skew[0]

record = os.environ.get("LMFORGE_TEST_RECORD")
if record:
    import json

    from lmforge.data.loader import ShardLoader

    read = ShardLoader.next_batch

    def next_batch(self):
        per_rank = self.global_batch // self.world_size
        ids = self.global_windows(self.samples_seen + self.rank * per_rank, per_rank)
        with open(os.path.join(record, f"windows_rank{os.environ['RANK']}.jsonl"), "a") as f:
            f.write(json.dumps({"samples_seen": self.samples_seen, "windows": [int(i) for i in ids]}) + "\n")
        return read(self)

    ShardLoader.next_batch = next_batch

sys.exit(cli.main(sys.argv[1:]))
