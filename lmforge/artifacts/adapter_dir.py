"""LoRA adapter dirs (RUN/adapter of a ``finetune.mode=lora`` run): the adapter tensors (+ a classifier
head) and a reference to the base model dir, checked by a cheap fingerprint.

A language-model adapter on a base that exports to a Hugging Face family with linear projections (Llama,
Mistral, Qwen2, Qwen3, …) is written in PEFT's format, so ``peft.PeftModel.from_pretrained(hf_base, dir)``
loads it on ``lmforge export``'s output:

    adapter_config.json        PEFT's LoRA config (`lmforge.artifacts.hf.peft_format`)
    adapter_model.safetensors  the LoRA tensors under PEFT's names for that family
    lmforge_adapter.json       the ``lmforge`` metadata block, base_model, base_fingerprint, rank, alpha,
                               targets (see `metadata`), and ``hf_family``

Other adapters (classifier / reward heads, GPT-2 / BERT bases, bases no HF family expresses) keep
lmforge's own layout, which older runs wrote for every adapter and which still loads:

    adapter_config.json        the ``lmforge`` metadata block (task, labels, pooling), base_model,
                               base_fingerprint, rank, alpha, targets
    adapter_model.safetensors  the ``lora_*`` tensors (and ``score.*`` for classifiers / reward models)

`load_adapter` also loads a PEFT LoRA adapter trained elsewhere, on an imported base (``base=``).

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

from lmforge.artifacts.hf import peft_format
from lmforge.artifacts.hf.families import FAMILIES, Family
from lmforge.artifacts.metadata import (
    ADAPTER_CONFIG,
    ADAPTER_META,
    adapter_config_json,
    is_adapter_dir,
    is_model_dir,
    read_metadata,
    read_raw,
    write_json,
)
from lmforge.artifacts.model_dir import load_model_dir, load_weights, save_weights
from lmforge.atomic import atomic_directory
from lmforge.config import UserError
from lmforge.models.classifier import SequenceClassifier
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.models.reward import RewardModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _base_family(base_model: str | os.PathLike, family: str | None = None) -> Family | None:
    """The PEFT-expressible HF family of a base model dir (as `export_hf` exports it), or None."""
    if not is_model_dir(base_model):
        return None
    info = read_metadata(base_model)
    if info.kind != "model" or info.task != "lm":
        return None
    return peft_format.peft_family(info.model_config(), info.hf, family)


def save_adapter_dir(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], base_model: str,
                     base_fingerprint: str, rank: int, alpha: float, targets: Sequence[str], task: str = "lm",
                     labels: Sequence[str] | None = None, pooling: str | None = None,
                     family: str | None = None, peft: bool | None = None) -> Path:
    """Write an adapter dir atomically: in PEFT's format where the base allows it (``peft=None``: decide;
    ``True``: required, a one-line error otherwise; ``False``: lmforge's own layout)."""
    meta = adapter_config_json(str(Path(base_model).resolve()), base_fingerprint, rank, alpha, list(targets),
                               task, labels=list(labels) if labels is not None else None, pooling=pooling)
    fam = None
    if peft is not False and task == "lm" and not any(k.startswith("score.") for k in state_dict):
        fam = _base_family(base_model, family)
    if peft and fam is None:
        raise UserError(f"the base model '{base_model}' has no Hugging Face family with linear projections "
                        "(llama, mistral, qwen2, qwen3, …), or the adapter has a head: it cannot be a PEFT adapter")
    with atomic_directory(directory) as tmp:
        if fam is None:
            save_weights(state_dict, tmp, weights_name=ADAPTER_WEIGHTS)
            write_json(tmp / ADAPTER_CONFIG, meta)
        else:
            adapted = sorted({k.rsplit(".", 2)[-2] for k in state_dict})
            save_weights(peft_format.to_peft_names(fam, state_dict), tmp, weights_name=ADAPTER_WEIGHTS)
            write_json(tmp / ADAPTER_CONFIG, peft_format.peft_config(fam, rank, alpha, adapted,
                                                                     meta["base_model"]))
            write_json(tmp / ADAPTER_META, {**meta, "hf_family": fam.name})
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
    out = {**info.adapter, **info.task_fields(), "lmforge_version": info.lmforge_version}
    if info.extra.get("hf_family") in FAMILIES:
        out["hf_family"] = info.extra["hf_family"]
    return out


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


def _foreign_peft(d: Path, base: str | os.PathLike | None) -> dict[str, Any] | None:
    """The meta of a PEFT adapter written by another tool (no lmforge metadata), on base ``base`` (default:
    its ``base_model_name_or_path`` when that is a local lmforge model dir); None for lmforge's dirs."""
    if (d / ADAPTER_META).is_file() or not (d / ADAPTER_CONFIG).is_file():
        return None
    raw = read_raw(d / ADAPTER_CONFIG, "adapter config")
    if not peft_format.is_peft_config(raw) or "base_fingerprint" in raw:
        return None
    base = base if base is not None else raw.get("base_model_name_or_path")
    if base is None or not is_model_dir(base):
        raise UserError(f"'{d}' is a PEFT adapter whose base '{base}' is not an lmforge model dir; import the "
                        "base (`lmforge import --hf HF_DIR --out BASE`) and pass load_adapter(DIR, base=BASE)")
    fam = _base_family(base)
    if fam is None:
        raise UserError(f"the base '{base}' has no Hugging Face family PEFT adapters are named for (llama, "
                        "mistral, qwen2, qwen3, …); import the base the adapter was trained on")
    settings = peft_format.lora_settings(raw, fam, str(d / ADAPTER_CONFIG))
    if (d / "adapter_model.bin").is_file() and not (d / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"'{d}' holds adapter_model.bin; lmforge reads safetensors only: re-save the adapter "
                        "with peft's save_pretrained(safe_serialization=True)")
    return {**settings, "base_model": str(base), "base_fingerprint": None, "task": "lm",
            "hf_family": fam.name, "lmforge_version": None, "peft": True}


def load_adapter(directory: str | os.PathLike, device="cpu", check_base: bool = True,
                 base: str | os.PathLike | None = None):
    """Base model + LoRA adapters, unmerged (a `Transformer`, or a `SequenceClassifier` for classifiers).
    Returns (model, meta). The merged equivalent is the run's RUN/model. ``base`` (an lmforge model dir,
    e.g. an import) is needed for a PEFT adapter trained elsewhere; for lmforge's dirs it replaces the
    recorded base (which must still have the same fingerprint)."""
    d = Path(directory)
    meta = _foreign_peft(d, base)
    if meta is None:
        meta = read_adapter_meta(d)
        if base is not None:
            meta["base_model"] = str(base)
    base = meta["base_model"]
    if not Path(base).is_dir():
        raise UserError(f"the base model '{base}' named in {d / ADAPTER_CONFIG} is gone; use the merged "
                        "RUN/model")
    if check_base and meta["base_fingerprint"] is not None and model_fingerprint(base) != meta["base_fingerprint"]:
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
    if any(k.startswith(peft_format.PEFT_PREFIX) for k in sd):  # PEFT's names: back to lmforge's
        fam = FAMILIES.get(meta.get("hf_family")) or _base_family(base)
        if fam is None:
            raise UserError(f"'{d}' holds PEFT tensor names but its base '{base}' has no matching Hugging Face "
                            "family; load it on the base it was trained on")
        sd = peft_format.from_peft_names(fam, sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "lora_" in k or k.startswith("score.")]
    if missing or unexpected:
        raise UserError(f"adapters in '{directory}' do not fit the base model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model.to(device).eval(), meta


def read_adapter_tensors(directory: str | os.PathLike, meta: dict[str, Any] | None = None
                         ) -> dict[str, torch.Tensor]:
    """An lmforge adapter dir's tensors under lmforge's names (``layers.0.attention.wq.lora_A``), whichever
    layout the dir has."""
    d = Path(directory)
    meta = meta if meta is not None else read_adapter_meta(d)
    sd = load_weights(d, weights_name=ADAPTER_WEIGHTS)
    if any(k.startswith(peft_format.PEFT_PREFIX) for k in sd):
        fam = FAMILIES.get(meta.get("hf_family")) or _base_family(meta["base_model"])
        if fam is None:
            raise UserError(f"'{d}' holds PEFT tensor names but no family to read them with; its base "
                            f"'{meta['base_model']}' changed or is gone")
        sd = peft_format.from_peft_names(fam, sd)
    return sd


def export_peft(directory: str | os.PathLike, out: str | os.PathLike, family: str | None = None) -> dict[str, Any]:
    """`lmforge export --format peft`: an adapter dir (either layout) → a PEFT-format adapter dir for the
    Hugging Face export of its base (``family`` as `export --family`). Returns a summary."""
    d = Path(directory)
    if is_model_dir(d):
        raise UserError(f"'{d}' is a model dir; --format peft exports an adapter dir (RUN/adapter of a "
                        "finetune.mode=lora run)")
    meta = read_adapter_meta(d)
    if not Path(meta["base_model"]).is_dir():
        raise UserError(f"the base model '{meta['base_model']}' named in '{d}' is gone; its family cannot be "
                        "checked")
    sd = read_adapter_tensors(d, meta)
    save_adapter_dir(out, sd, meta["base_model"], meta["base_fingerprint"], meta["rank"], meta["alpha"],
                     meta["targets"], task=meta.get("task", "lm"), labels=meta.get("labels"),
                     pooling=meta.get("pooling"), family=family, peft=True)
    fam = read_adapter_meta(out)["hf_family"]
    return {"out": str(out), "family": fam, "rank": meta["rank"], "alpha": meta["alpha"],
            "tensors": len(sd), "params": sum(v.numel() for v in sd.values())}
