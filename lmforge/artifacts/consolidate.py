"""The one path from a training model (plain, DDP, FSDP2-sharded, tensor-parallel, compiled) to a whole
model ready to be written as a model dir:

    gather the full state dict on every rank (a collective; CPU-offloaded)
    → rank 0 builds a shell of the model's structure on the meta device (no memory)
    → ``load_state_dict(assign=True)`` moves the gathered tensors in, strictly
    → ``tie_weights()`` re-ties a tied LM head; derived buffers (RoPE) are computed on CPU
    → tensors the shell has no place for (injected heads such as ``model.mlm``) ride along in
      ``shell.extra_state_dict`` for the save function that knows them.

Pretraining (``Trainer.export_model``) and fine-tuning's end of run both call `consolidate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def gather_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU. Every rank must call it (it gathers shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def drop_shared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each storage kept once (a tied LM head is the embedding: ``tie_weights``
    restores it on load)."""
    seen: set = set()
    out = {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.device.type)
        if key not in seen:
            out[k] = v
        seen.add(key)
    return out


def model_class(model: nn.Module) -> type:
    """The model's own class: ``fully_shard`` / ``replicate`` swap in a subclass made in torch.distributed
    (replicate's cannot be built again), so take the first class in the MRO from outside torch."""
    return next(c for c in type(model).__mro__ if not c.__module__.startswith("torch."))


def meta_shell(template: nn.Module) -> nn.Module:
    """An empty model of ``template``'s own class and config on the meta device."""
    with torch.device("meta"):
        return model_class(template)(template.cfg)


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def load_into_shell(shell: nn.Module, sd: dict[str, torch.Tensor], keep_extra: bool = True) -> nn.Module:
    """Move ``sd``'s tensors into a meta ``shell`` (strict: a missing key fails; an extra key fails unless
    ``keep_extra``, which keeps them in ``shell.extra_state_dict``), then re-tie a tied LM head."""
    backbone = _backbone(shell)
    tied = bool(backbone.cfg.tie_embeddings)

    def is_tied_head(k: str) -> bool:  # the LM head of a tied backbone (not a classifier's score)
        return tied and k.endswith("output.weight") and not k.startswith("score")

    sd = {k: v for k, v in sd.items() if not is_tied_head(k)}
    missing, unexpected = shell.load_state_dict(sd, assign=True, strict=False)
    missing = [k for k in missing if not is_tied_head(k)]
    if missing or (unexpected and not keep_extra):
        raise RuntimeError(f"the trained state does not match the {type(shell).__name__} being saved: missing "
                           f"{missing[:3]}, unexpected {unexpected[:3]}")
    backbone.tie_weights()
    if hasattr(backbone, "init_buffers"):  # derived non-persistent buffers (RoPE, sinusoidal) off the meta device
        backbone.init_buffers()
    shell.extra_state_dict = {k: sd[k] for k in unexpected}  # injected heads' weights (model.mlm, …)
    return shell


def consolidate(model: nn.Module, is_main: bool, build_shell: Callable[[], nn.Module] | None = None,
                template: nn.Module | None = None, keep_extra: bool = True) -> nn.Module | None:
    """Gather ``model`` (all ranks call this) and, on the main rank, return a whole copy on CPU in a shell:
    ``build_shell()`` (the structure to save, built on the meta device), else the class and config of
    ``template`` (the unwrapped training model; default ``model``). Other ranks get None."""
    sd = gather_state_dict(model)
    if not is_main:
        return None
    if build_shell is not None:
        with torch.device("meta"):
            shell = build_shell()
    else:
        shell = meta_shell(template if template is not None else model)
    return load_into_shell(shell, sd, keep_extra=keep_extra)


__all__ = ["consolidate", "drop_shared", "gather_state_dict", "load_into_shell", "meta_shell", "model_class"]
