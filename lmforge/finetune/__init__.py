"""Fine-tuning: instruction SFT, LoRA and classification recipes over the shared Trainer, and their data layer
(``config.load_config``, ``recipes.finetune``)."""
