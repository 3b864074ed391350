"""LoRA adapter dirs (RUN/adapter of a ``finetune.mode=lora`` run): the adapter tensors (+ a classifier
head) and a reference to the base model dir, checked by a cheap fingerprint.

    adapter_config.json        the ``lmforge`` metadata block (task, labels, pooling), base_model,
                               base_fingerprint, rank, alpha, targets (see `metadata`)
    adapter_model.safetensors  the ``lora_*`` tensors (and ``score.*`` for classifiers / reward models)

Fine-tuning writes these dirs; evaluation and generation load them through `load_adapter`, so neither
needs the fine-tuning package.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.metadata import (
    ADAPTER_CONFIG,
    adapter_config_json,
    is_adapter_dir,
    read_metadata,
    write_json,
)
from lmforge.artifacts.model_dir import load_model_dir, load_weights, save_weights
from lmforge.atomic import atomic_directory
from lmforge.config import UserError
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.models.reward import RewardModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter_dir(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], base_model: str,
                     base_fingerprint: str, rank: int, alpha: float, targets: Sequence[str], task: str = "lm",
                     labels: Sequence[str] | None = None, pooling: str | None = None) -> Path:
    """Write an adapter dir atomically: the adapter tensors and adapter_config.json."""
    meta = adapter_config_json(str(Path(base_model).resolve()), base_fingerprint, rank, alpha, list(targets),
                               task, labels=list(labels) if labels is not None else None, pooling=pooling)
    with atomic_directory(directory) as tmp:
        save_weights(state_dict, tmp, weights_name=ADAPTER_WEIGHTS)
        write_json(tmp / ADAPTER_CONFIG, meta)
    return Path(directory)


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter's fields in one flat dict: base_model, base_fingerprint, rank, alpha, targets, task,
    labels, pooling (any metadata format)."""
    if not is_adapter_dir(directory):
        raise UserError(f"'{directory}' is not an adapter dir ({ADAPTER_CONFIG} is missing); pass "
                        "RUN/adapter of a finetune.mode=lora run")
    info = read_metadata(directory)
    if info.kind != "adapter":
        raise UserError(f"'{directory}' holds a config.json: it is a model dir, not an adapter dir")
    return {**info.adapter, **info.task_fields(), "lmforge_version": info.lmforge_version}


def model_fingerprint(directory: str | os.PathLike) -> str:
    """A cheap identity of a model dir: config.json, and each weight file's size plus its first and last
    MiB. Frozen weights are not checkpointed, so a resume checks the base is still the same."""
    d = Path(directory)
    h = hashlib.sha256((d / "config.json").read_bytes())  # the bytes, not the metadata: any edit counts
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
    d = Path(directory)
    meta = read_adapter_meta(d)
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
