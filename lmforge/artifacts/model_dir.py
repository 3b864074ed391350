"""A model dir: ``config.json`` (the ModelConfig + the ``lmforge`` metadata block, see `metadata`) +
``model.safetensors`` (sharded with an index above a size limit) + tokenizer files. Loading never unpickles.

`write_model_dir` is the one writer every kind of model dir (LM, classifier, reward model, encoder with
heads) goes through."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.metadata import CONFIG_NAME, model_config_json, read_metadata, write_json
from lmforge.atomic import atomic_directory
from lmforge.config import UserError, read_json_bounded, to_dict
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied duplicate (safetensors refuses shared storage)."""
    sd = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def save_weights(state_dict: dict[str, torch.Tensor], directory: str | os.PathLike,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 weights_name: str = WEIGHTS_NAME) -> list[str]:
    """Write safetensors into ``directory`` (one file, or shards + an index). Returns the file names."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(directory / weights_name), metadata=meta)
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names + [f"{stem}.safetensors.index.json"]


def index_weight_map(index: Path, fix: str) -> dict[str, Path]:
    """Tensor name -> shard file of a ``*.index.json``, checked: its ``weight_map`` must map to plain file
    names beside the index, and every file must exist. ``fix`` ends the error message."""
    weight_map = read_json_bounded(index, what="weights index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
            for v in weight_map.values()):
        raise UserError(f"'{index}' has no valid 'weight_map' (shard file names); {fix}")
    for name in sorted(set(weight_map.values())):
        if not (index.parent / name).is_file():
            raise UserError(f"shard '{index.parent / name}' named in {index.name} is missing; {fix}")
    return {key: index.parent / name for key, name in weight_map.items()}


def index_shards(index: Path, fix: str) -> list[Path]:
    """The shard files a ``*.index.json`` names, sorted, each once (checked as in `index_weight_map`)."""
    return sorted(set(index_weight_map(index, fix).values()))


def load_weights(directory: str | os.PathLike, weights_name: str = WEIGHTS_NAME) -> dict[str, torch.Tensor]:
    """Read a single or sharded safetensors checkpoint (never pickle)."""

    directory = Path(directory)
    single = directory / weights_name
    index = directory / (weights_name.removesuffix(".safetensors") + ".safetensors.index.json")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for path in index_shards(index, "re-export the model dir"):
            out.update(read_safetensors(path))
        return out
    raise UserError(f"'{directory}' holds no {weights_name} (or its index); pass a model dir "
                    "written by lmforge (RUN/model, `lmforge import`)")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors ``load_file`` with a one-line error for an empty, truncated or foreign file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError...: all mean an unreadable file
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise UserError(f"'{path}' is not a readable safetensors file ({reason}); it is empty, truncated or "
                        "not safetensors — re-export or re-download the model dir") from None


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model dir (any metadata format)."""
    return read_metadata(directory).model_config()


def write_model_dir(directory: str | os.PathLike, cfg: ModelConfig, state_dict: dict[str, torch.Tensor] | None,
                    tokenizer_dir: str | os.PathLike | None = None, task: str = "lm",
                    extra: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    write_more: Callable[[Path], None] | None = None, **fields: Any) -> Path:
    """Write a complete model dir atomically (built in a temp dir beside the target, then renamed):
    config.json in the current metadata format (``fields``: labels, pooling, max_tokens, heads,
    tokenizer_hash), the weights (``None``: ``write_more`` writes them), the tokenizer files of
    ``tokenizer_dir``, then ``write_more(tmp)``."""
    with atomic_directory(directory) as tmp:
        write_json(tmp / CONFIG_NAME, model_config_json(to_dict(cfg), task, extra=extra, **fields))
        if state_dict is not None:
            save_weights(state_dict, tmp, max_shard_bytes)
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if write_more is not None:
            write_more(tmp)
    return Path(directory)


def save_model_dir(model: torch.nn.Module, directory: str | os.PathLike, tokenizer_dir: str | None = None,
                   extra: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A language model (or encoder) as a model dir; ``extra``: provenance keys (and schema fields such
    as ``tokenizer_hash``, which go into the metadata block)."""
    return write_model_dir(directory, model.cfg, unique_state_dict(model), tokenizer_dir, extra=extra,
                           max_shard_bytes=max_shard_bytes)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "lmforge_tokenizer.json", "chat_template.jinja")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copy2(p, Path(dst) / name)
            copied.append(name)
    return copied


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Build the model from ``config.json`` and load its weights (strict: missing or extra keys fail)."""
    info = read_metadata(directory)
    if info.kind == "model" and info.task != "lm":
        what = {"classify": "a classifier", "reward": "a reward model"}[info.task]
        raise UserError(f"'{directory}' is {what} dir, not a language model; pass a language-model dir "
                        "(RUN/model of pretraining or SFT, or an imported model)")
    model = build_model(info.model_config(), device=device, dtype=dtype, init=False)
    load_state_strict(model, load_weights(directory), directory)
    return model


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """Load a Transformer's weights; any missing or extra key fails (a tied head is re-tied, not loaded)."""
    tied = model.cfg.tie_embeddings
    if tied:
        sd = {k: v for k, v in sd.items() if k != "output.weight"}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "output.weight")]
    if missing or unexpected:
        raise UserError(f"weights in '{directory}' do not match its config.json: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; re-export the model dir")
    model.tie_weights()
