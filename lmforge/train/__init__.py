"""Training: the Trainer loop, optimizer + schedules, losses, DCP checkpoints, metrics (the tasks that use it are
in `lmforge.tasks`). Import from the modules; this package file imports nothing."""
