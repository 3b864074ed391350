"""lmforge.distributed."""
