"""`lmforge finetune`: the command module only (`lmforge.finetune.commands`); fine-tuning itself is in
`lmforge.tasks` (sft, classify, preference, reward) and runs through `lmforge.tasks.run.run`."""
