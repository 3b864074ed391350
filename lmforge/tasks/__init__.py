"""Training tasks: one module per way of training (pretrain, mlm, sft with optional LoRA, classify, preference,
reward), each a `lmforge.tasks.base.Task`, found by name in `lmforge.tasks.registry`, and run by the one
entry point `lmforge.tasks.run.run`. Importing this package imports nothing else: `lmforge.tasks.config`
(the fine-tuning config) is read without torch.
"""
