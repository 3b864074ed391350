"""lmforge: train 7B-class language models end to end."""

__version__ = "0.1.0"
