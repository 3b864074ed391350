"""LoRA (Hu et al., 2021), injected: `apply_lora` swaps chosen `nn.Linear` modules for `LoRALinear`.

`LoRALinear` *is* an `nn.Linear` (same `weight`/`bias` keys, so base checkpoints load unchanged) with two
extra parameters: ``lora_A`` (rank × in, Kaiming-uniform) and ``lora_B`` (out × rank, zeros), so the
adapted model starts exactly equal to the base model. y = x Wᵀ + b + (α/r) · dropout(x) Aᵀ Bᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError

# Short names of the Transformer's linear layers.
ATTENTION = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])  # or ["all-linear"], ["attention"], ["mlp"]

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank={self.rank} must be a positive integer (typical: 8-64)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")

    def target_names(self) -> set[str]:
        names: set[str] = set()
        for t in self.targets:
            if t == "all-linear":
                names |= set(ATTENTION) | set(MLP)
            elif t == "attention":
                names |= set(ATTENTION)
            elif t == "mlp":
                names |= set(MLP)
            elif t in ATTENTION or t in MLP:
                names.add(t)
            else:
                raise ConfigError(f"lora.targets has unknown '{t}'; use names from {ATTENTION + MLP} "
                                  "or 'attention', 'mlp', 'all-linear'")
        return names


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B.zero_()

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, dropout: float) -> "LoRALinear":
        new = cls(base.in_features, base.out_features, base.bias is not None, rank, alpha, dropout,
                  device=base.weight.device, dtype=base.weight.dtype)
        new.weight = base.weight
        new.bias = base.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}, alpha={self.alpha}"


def apply_lora(model: nn.Module, cfg: LoraConfig, trainable: tuple[str, ...] = ()) -> dict[str, int]:
    """Swap target linears for LoRALinear in place; freeze everything but the adapters (and any
    parameter whose name starts with a prefix in ``trainable``, e.g. a classification head).
    Returns {"trainable": n, "total": n, "adapted_modules": n}."""
    names = cfg.target_names()
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                setattr(parent, child_name, LoRALinear.from_linear(child, cfg.rank, cfg.alpha, cfg.dropout))
                swapped += 1
    if swapped == 0:
        raise ConfigError(f"lora.targets={cfg.targets} matched no linear layer in the model")
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or any(name.startswith(t) for t in trainable)
    return {**trainable_summary(model), "adapted_modules": swapped}


def trainable_summary(model: nn.Module) -> dict[str, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain nn.Linear back. Returns how many were merged."""
    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.weight.device, dtype=child.weight.dtype)
                plain.weight.copy_(child.merged_weight())
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
                plain.weight.requires_grad_(True)
                setattr(parent, child_name, plain)
                merged += 1
    return merged


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (plus nothing else): what an adapter-only checkpoint stores."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A" in k or ".lora_B" in k}
