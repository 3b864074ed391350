"""lmforge.finetune."""
