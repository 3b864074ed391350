"""Injected encoder heads (``model.mlm``, ``model.pooler``) stored beside the backbone of a model dir:
``heads.safetensors`` (keys ``mlm.*``, ``pooler.*``) and their names in the metadata's ``heads`` list, so
`load_model_dir` still loads the backbone alone."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import read_safetensors, unique_state_dict, write_model_dir
from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.heads import HEAD_CLASSES

HEADS_NAME = "heads.safetensors"


def save_heads(heads: dict[str, nn.Module], directory: str | os.PathLike) -> list[str]:
    """Write ``heads.safetensors`` (``name.param`` keys) into ``directory`` atomically; returns the names.
    The caller records the names in the metadata (``heads=[...]``)."""
    return save_head_tensors({f"{name}.{k}": v for name, head in heads.items() for k, v in head.state_dict().items()},
                             directory, names=list(heads))


def save_head_tensors(tensors: dict[str, torch.Tensor], directory: str | os.PathLike,
                      names: list[str] | None = None) -> list[str]:
    """``heads.safetensors`` from ``name.param`` tensors (atomic); returns the head names."""
    from safetensors.torch import save_file

    path = Path(directory) / HEADS_NAME
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)
    return names if names is not None else sorted({k.split(".")[0] for k in tensors})


def head_names(directory: str | os.PathLike) -> list[str]:
    """The heads a model dir lists ([] for a dir without metadata or heads)."""
    if not (Path(directory) / "config.json").is_file():
        return []
    return list(read_metadata(directory).heads)


def read_head_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the heads a model dir lists ({} when it lists none)."""
    names = head_names(directory)
    if not names:
        return {}
    path = Path(directory) / HEADS_NAME
    if not path.is_file():
        raise UserError(f"'{directory}' lists heads {names} in config.json but {HEADS_NAME} is missing; "
                        "re-import or re-export the model dir")
    return read_safetensors(path)


def load_heads(directory: str | os.PathLike, cfg: ModelConfig, device="cpu",
               dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """The heads a model dir lists, loaded from ``heads.safetensors`` ({} when none)."""
    sd = read_head_tensors(directory)
    out: dict[str, nn.Module] = {}
    for name in head_names(directory):
        if name not in HEAD_CLASSES:
            raise UserError(f"'{directory}' lists an unknown head '{name}'; known: {', '.join(HEAD_CLASSES)}")
        part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        if not part:
            raise UserError(f"head '{name}' listed in '{directory}' has no tensors in {HEADS_NAME}; "
                            "re-import or re-export the model dir")
        head = HEAD_CLASSES[name](cfg, device=device, dtype=dtype or next(iter(part.values())).dtype)
        missing, unexpected = head.load_state_dict(part, strict=False)
        if missing or unexpected:
            raise UserError(f"head '{name}' in '{directory}' does not match the config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        out[name] = head
    return out


def save_model_dir_with_heads(model: nn.Module, directory: str | os.PathLike, tokenizer_dir: str | None = None,
                              extra: dict | None = None) -> Path:
    """`save_model_dir` for a backbone carrying injected heads (``model.mlm``, ``model.pooler``, or, for a
    consolidated copy, their tensors in ``model.extra_state_dict``): the backbone goes to
    model.safetensors, the heads to heads.safetensors, their names to the metadata."""
    head_sd = {f"{n}.{k}": v for n in HEAD_CLASSES if isinstance(getattr(model, n, None), nn.Module)
               for k, v in getattr(model, n).state_dict().items()}
    extra_sd = getattr(model, "extra_state_dict", None) or {}
    head_sd.update({k: v for k, v in extra_sd.items() if k.split(".")[0] in HEAD_CLASSES and k not in head_sd})
    names = [n for n in HEAD_CLASSES if any(k.startswith(n + ".") for k in head_sd)]
    sd = {k: v for k, v in unique_state_dict(model).items() if k.split(".")[0] not in names}
    return write_model_dir(directory, model.cfg, sd, tokenizer_dir, extra=extra, heads=names or None,
                           write_more=(lambda tmp: save_head_tensors(head_sd, tmp, names)) if names else None)


__all__ = ["HEADS_NAME", "head_names", "load_heads", "read_head_tensors", "save_head_tensors", "save_heads",
           "save_model_dir_with_heads"]
