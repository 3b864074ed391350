"""Load what `lmforge eval` scores: a plain LM, a classifier model dir or a LoRA adapter dir."""

from __future__ import annotations

from pathlib import Path

from lmforge.artifacts.adapter_dir import load_adapter
from lmforge.artifacts.classifier_dir import load_classifier_dir
from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import UserError
from lmforge.tokenizer.core import load_tokenizer


def load_for_eval(model_dir, device, dtype):
    """(model, tokenizer, labels) for a model dir: a plain LM (labels None), a classifier model dir
    (``task: classify``), or a LoRA adapter dir (adapters + a reference to the base model dir)."""
    d = Path(model_dir)
    info = read_metadata(d)
    labels = None
    tok_dir = d
    if info.kind == "adapter":
        model, meta = load_adapter(d, device=device)
        model = model.to(dtype)
        labels = list(info.labels) if info.task == "classify" else None
        if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
            tok_dir = Path(meta["base_model"])
    elif info.task == "classify":
        model, labels = load_classifier_dir(d, device=device, dtype=dtype)
    else:
        model = load_model_dir(d, device=device, dtype=dtype)
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer in '{tok_dir}' has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size} embeddings; the model dir mixes files from different models")
    return model.eval(), tokenizer, labels
