"""Reward model dirs: a normal model dir whose metadata says ``task: reward``; its weights are the
backbone's keys plus ``score.weight``. `export_reward_hf` writes one as a HF sequence classifier."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import (
    load_state_strict,
    load_weights,
    save_weights,
    unique_state_dict,
    write_model_dir,
)
from lmforge.atomic import atomic_directory
from lmforge.config import UserError
from lmforge.models.reward import TASK, RewardModel
from lmforge.models.transformer import build_model


def save_reward_dir(model: RewardModel, directory: str | os.PathLike, tokenizer_dir: str | None = None,
                    extra: dict | None = None) -> Path:
    sd = unique_state_dict(model.backbone)
    sd["score.weight"] = model.score.weight.detach()
    return write_model_dir(directory, model.cfg, sd, tokenizer_dir, task=TASK, extra=extra, pooling="last")


def is_reward_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / "config.json").is_file() and read_metadata(d).task == TASK


def load_reward_dir(directory: str | os.PathLike, device="cpu", dtype=torch.float32) -> RewardModel:
    if not is_reward_dir(directory):
        raise UserError(f"'{directory}' is not a reward model dir (its metadata has no task: reward); train one "
                        "with finetune.mode=reward")
    cfg = read_metadata(directory).model_config()
    model = RewardModel(build_model(cfg, device=device, dtype=dtype, init=False))
    sd = load_weights(directory)
    score = sd.pop("score.weight", None)
    if score is None:
        raise UserError(f"'{directory}' holds no score.weight; the reward model dir is incomplete")
    load_state_strict(model.backbone, sd, directory)
    with torch.no_grad():
        model.score.weight.copy_(score)
    return model.to(device).eval()


def export_reward_hf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None
                     ) -> dict[str, Any]:
    """Write a reward model dir as HF ``<Family>ForSequenceClassification`` (``num_labels=1``): the
    backbone under the family's base-model prefix, ``score.weight``, and the tokenizer files."""
    from lmforge.artifacts.hf import tokenizer_files
    from lmforge.artifacts.hf.convert import DTYPES, _check_out, _hf_dtype_name, lmforge_to_hf_state_dict
    from lmforge.artifacts.hf.families import FAMILIES, family_for_model_config, model_config_to_hf

    model_dir, out = Path(model_dir), Path(out)
    _check_out(model_dir, out)
    info = read_metadata(model_dir)
    cfg = info.model_config()
    record = info.hf
    fam = FAMILIES[record["family"]] if record.get("family") in FAMILIES else family_for_model_config(cfg)
    if fam.name not in ("llama", "mistral", "qwen2"):
        raise UserError(f"reward models export as Llama/Mistral/Qwen2 sequence classifiers; '{model_dir}' maps to "
                        f"{fam.name}")
    sd = load_weights(model_dir)
    score = sd.pop("score.weight")
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
        score = score.to(DTYPES[dtype])
    if cfg.lm_head and not cfg.tie_embeddings:
        sd.setdefault("output.weight", torch.zeros(cfg.vocab_size, cfg.dim, dtype=score.dtype))
    hf_sd = lmforge_to_hf_state_dict(fam, cfg, sd)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith("lm_head.")}
    hf_sd["score.weight"] = score.contiguous()
    base = dict(record.get("config") or {}) if record.get("family") == fam.name else {}
    hf_cfg = model_config_to_hf(cfg, fam, base)
    arch = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
            "qwen2": "Qwen2ForSequenceClassification"}[fam.name]
    hf_cfg.update(architectures=[arch], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  problem_type="regression")
    hf_cfg.pop("dtype", None)
    hf_cfg["torch_dtype"] = _hf_dtype_name(score.dtype)
    with atomic_directory(out) as tmp:
        tok_info = tokenizer_files.export_tokenizer(model_dir, tmp, cfg, hf_cfg)  # fills *_token_id
        if hf_cfg.get("pad_token_id") is None:  # HF reads the score at the last token that is not pad_token_id
            hf_cfg["pad_token_id"] = hf_cfg.get("eos_token_id")
        (tmp / "config.json").write_text(json.dumps(dict(sorted(hf_cfg.items())), indent=2) + "\n")
        files = save_weights(hf_sd, tmp)
    return {"family": fam.name, "architecture": arch, "out": str(out), "files": files,
            "dtype": hf_cfg["torch_dtype"], "tokenizer": tok_info, "params": sum(v.numel() for v in hf_sd.values())}


__all__ = ["export_reward_hf", "is_reward_dir", "load_reward_dir", "save_reward_dir"]
