"""One rank of `lmforge CMD ...` through the real CLI, with an optional test hook (see test_trainer_stop.py).

usage: python _trainer_cli_worker.py pretrain --config CFG [overrides]   (RANK, WORLD_SIZE, MASTER_* set)
LMFORGE_TEST_HOOK="KIND:RANK:STEP" acts on rank RANK just before it trains step STEP + 1:
  SIGTERM / SIGINT  the rank sends itself that signal (one rank only: the others never see it)
  clock             the rank's clock jumps ahead by a day (it alone reaches train.time_limit_minutes)
"""

import os
import signal
import sys

from lmforge import cli
from lmforge.train import trainer as trainer_mod

hook = os.environ.get("LMFORGE_TEST_HOOK")
if hook:
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

sys.exit(cli.main(sys.argv[1:]))
