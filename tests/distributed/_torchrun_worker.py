"""`lmforge pretrain` under torchrun, with rank 1 exiting on purpose once at step 5 (see test_dist_failure.py).

usage: python -m torch.distributed.run ... _torchrun_worker.py CONFIG MARKER [section.key=value ...]
The first attempt's rank 1 creates MARKER and exits with code 3 before step 5; torchrun restarts the
group and train.resume=auto continues from the last checkpoint.
"""

import os
import sys
from pathlib import Path

from lmforge.tasks.run import run
from lmforge.train import trainer as trainer_mod
from lmforge.train.config import load_config

config, marker = sys.argv[1], Path(sys.argv[2])
cfg = load_config(config, sys.argv[3:])
original_step = trainer_mod.Trainer.train_step


def train_step(self, batch):
    if self.world.rank == 1 and self.step == 4 and not marker.exists():
        marker.write_text(f"attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')}\n")
        os._exit(3)
    return original_step(self, batch)


trainer_mod.Trainer.train_step = train_step
result = run(cfg).train
print(f"rank {os.environ['RANK']} finished at step {result.step}", flush=True)
