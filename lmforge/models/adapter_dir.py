"""LoRA adapter dirs (RUN/adapter of a ``finetune.mode=lora`` run): the adapter tensors (+ a classifier
head) and a reference to the base model dir, checked by a cheap fingerprint.

    adapter_config.json        base_model, base_fingerprint, rank, alpha, targets, task (+ labels, pooling)
    adapter_model.safetensors  the ``lora_*`` tensors (and ``score.*`` for classifiers)

Fine-tuning writes these dirs; evaluation and generation load them through `load_adapter`, so neither
needs the fine-tuning package.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lmforge.config import UserError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def model_fingerprint(directory: str | os.PathLike) -> str:
    """A cheap identity of a model dir: config.json, and each weight file's size plus its first and last
    MiB. Frozen weights are not checkpointed, so a resume checks the base is still the same."""
    d = Path(directory)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def load_adapter(directory: str | os.PathLike, device="cpu", check_base: bool = True):
    """Base model + LoRA adapters, unmerged (a `Transformer`, or a `SequenceClassifier` for classifiers).
    Returns (model, meta). The merged equivalent is the run's RUN/model."""
    from lmforge.models.classifier import SequenceClassifier
    from lmforge.models.lora import LoraConfig, apply_lora
    from lmforge.models.model_dir import load_model_dir, load_weights

    d = Path(directory)
    if not is_adapter_dir(d):
        raise UserError(f"'{directory}' is not an adapter dir ({ADAPTER_CONFIG} is missing); pass "
                        "RUN/adapter of a finetune.mode=lora run")
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    base = meta["base_model"]
    if not Path(base).is_dir():
        raise UserError(f"the base model '{base}' named in {d / ADAPTER_CONFIG} is gone; use the merged "
                        "RUN/model")
    if check_base and model_fingerprint(base) != meta["base_fingerprint"]:
        raise UserError(f"the base model '{base}' changed since the adapters were trained; use the merged "
                        "RUN/model")
    model = load_model_dir(base, device=device)
    if meta.get("task") == "classify":
        model = SequenceClassifier(model, len(meta["labels"]), meta.get("pooling", "last"))
    if meta.get("task") == "reward":
        from lmforge.models.reward import RewardModel

        model = RewardModel(model)
    apply_lora(model, LoraConfig(rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"]),
               trainable=("score.",))
    sd = load_weights(d, weights_name=ADAPTER_WEIGHTS)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "lora_" in k or k.startswith("score.")]
    if missing or unexpected:
        raise UserError(f"adapters in '{directory}' do not fit the base model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta
