"""AdamW with parameter groups: weight decay on matrices, none on norms, biases and embeddings
(unless the config asks for it)."""

from __future__ import annotations

import torch
from torch import nn

_NORMS = (nn.LayerNorm, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_norms_and_biases: bool = False,
                 decay_embeddings: bool = False) -> list[dict]:
    """Split parameters into a decayed and an undecayed group (each parameter once, tied ones included)."""
    decay, no_decay, seen = [], [], set()
    decay_names, no_decay_names = [], []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.Embedding):
                wd = decay_embeddings
            elif isinstance(module, _NORMS) or p_name == "bias" or p.ndim < 2:
                wd = decay_norms_and_biases
            else:
                wd = True
            (decay if wd else no_decay).append(p)
            (decay_names if wd else no_decay_names).append(full)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "names": no_decay_names})
    return groups


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.decay_norms_and_biases,
                          optim_cfg.decay_embeddings)
    for g in groups:
        g.pop("names")
    fused = optim_cfg.fused
    if fused is None:  # one fused kernel per step instead of ~10 foreach passes: ~3.5x faster on CPU
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
