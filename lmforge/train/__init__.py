"""Training: the Trainer loop, optimizer + schedules, DCP checkpoints, metrics, the pretraining recipe, the
quickstart and run reports. Import from the modules; this package file imports nothing."""
