"""Under torchrun: `lmforge finetune --config CFG` (the real CLI) for each CFG in turn, in one process group.

usage: python -m torch.distributed.run ... _finetune_worker.py CFG [CFG ...]
"""

import sys

from lmforge import cli

for config in sys.argv[1:]:
    rc = cli.main(["finetune", "--config", config])
    if rc:
        sys.exit(rc)
