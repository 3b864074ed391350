"""Muon (Jordan et al., 2024; "Muon is Scalable for LLM Training", Liu et al., 2025) for the hidden 2-D
matrices, AdamW for everything else, in ONE optimizer so the trainer, the schedule and DCP see one object.

A parameter group with ``muon=True`` takes, per matrix W (A×B) with gradient G:

    M ← μ·M + G                                   momentum buffer (state "momentum_buffer")
    U ← G + μ·M   (Nesterov)   or   M               the direction
    O ← NS₅(U)                                    ≈ the polar factor U·(UᵀU)^(-1/2): singular values ≈ 1
    W ← W·(1 − lr·wd) − lr·s(A, B)·O             decoupled weight decay, then the scaled update

with s = 0.2·sqrt(max(A, B)) (``match_rms_adamw``, the default: the update's RMS becomes ~0.2·lr, AdamW's
typical update RMS, so AdamW's lr and weight decay transfer), sqrt(max(1, A/B)) (``original``, Keller
Jordan's scale, meant for lr ≈ 0.02) or 1 (``none``). NS₅ is the quintic Newton–Schulz iteration
X ← a·X + (b·XXᵀ + c·(XXᵀ)²)·X with (a, b, c) = (3.4445, −4.7750, 2.0315) on X₀ = U/‖U‖_F: it pushes
every singular value into roughly [0.68, 1.14] in five steps, without an SVD.

Other groups are plain AdamW (torch's own functional kernel, fused where the trainer asks), with the same
state names as ``torch.optim.AdamW`` (step, exp_avg, exp_avg_sq).

Sharded parameters (DTensors from FSDP2's dim-0 shards or TP's dim-0/dim-1 splits): Newton–Schulz needs
the FULL matrix. ``ns_work="split"`` (default): on a 1-D mesh (FSDP2 alone, or TP alone) each matrix gets
one owner rank (least-loaded by Newton–Schulz FLOPs, the same choice on every rank); the shards are
gathered on the owner only, which orthogonalizes and scatters the slices back: N ranks share the work,
and each matrix crosses the network about twice instead of to every rank. ``"replicate"``, and every
multi-dimensional mesh (FSDP2 × TP): every rank gathers every matrix (``full_tensor()``),
orthogonalizes it and keeps its own slice. Either way the result is the 1-process update. The momentum buffer stays sharded like the parameter, so DCP saves and reshards it.

Why not ``torch.optim.Muon`` (torch 2.13): it has the same update and the ``match_rms_adamw`` scale, but
accepts only 2-D parameters (so a second optimizer for AdamW), always runs Newton–Schulz in bf16 (slower
than fp32 on CPU) and does nothing explicit for a sharded DTensor: no full-matrix gather, no sharing of
the work between ranks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmforge.distributed import collectives

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: maximal slope at 0
LR_ADJUST = ("match_rms_adamw", "original", "none")
NS_WORK = ("split", "replicate")  # sharded matrices: Newton–Schulz on one owner rank each, or on every rank


def newton_schulz(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximate orthogonalization of a 2-D matrix (its polar factor), computed in ``dtype``; returns
    the result in ``g``'s dtype. Works on the wide orientation (rows ≤ columns) so XXᵀ is the small Gram."""
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # Frobenius norm ≥ spectral norm: every singular value ≤ 1
    for _ in range(steps):
        gram = x @ x.T  # (rows, rows)
        x = a * x + torch.addmm(gram, gram, gram, beta=b, alpha=c) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


def lr_scale(shape: torch.Size | tuple[int, ...], adjust: str) -> float:
    """The factor on the lr of a Muon update for a matrix of (global) ``shape``."""
    rows, cols = shape[0], shape[1]
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust == "none":
        return 1.0
    raise ValueError(f"lr adjust {adjust!r} is not one of {', '.join(LR_ADJUST)}")


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def _gather(u: Tensor) -> Tensor:
    """The full matrix of a DTensor on every rank (an all-gather over its mesh)."""
    return u.full_tensor()


def ns_flops(shape: tuple[int, ...], steps: int) -> int:
    """Multiply-add FLOPs of Newton–Schulz on a matrix of ``shape`` (m ≤ n after orientation)."""
    m, n = sorted(shape[:2])
    return steps * (4 * m * m * n + 2 * m ** 3)


def ranks_sharing(p: Tensor) -> int | None:
    """How many ranks can share the Newton–Schulz work of ``p``: its 1-D mesh's size (FSDP2 or TP alone);
    None for a plain tensor or a multi-dimensional mesh (FSDP2 × TP: every rank computes)."""
    if not _is_dtensor(p) or p.device_mesh.ndim != 1 or p.device_mesh.size() < 2:
        return None
    return p.device_mesh.size() if p.placements[0].is_shard() else None


def orthogonalize(u: Tensor, steps: int, dtype: torch.dtype, owner: int | None = None) -> Tensor:
    """Newton–Schulz on the full matrix of ``u``; a DTensor comes back with ``u``'s placements (this
    rank's slice of the full result).

    ``owner`` None: every rank gathers the whole matrix, orthogonalizes it and keeps its slice.
    ``owner`` k (a rank of ``u``'s 1-D mesh, ``u`` sharded on it): the shards go to rank k only, which
    orthogonalizes and scatters the slices back, so N ranks share the work (and the traffic) of N
    matrices."""
    if not _is_dtensor(u):
        return newton_schulz(u, steps, dtype=dtype)
    if owner is not None:
        return _orthogonalize_on_owner(u, steps, dtype, owner)
    from torch.distributed.tensor import distribute_tensor

    full = newton_schulz(_gather(u), steps, dtype=dtype)
    return distribute_tensor(full, u.device_mesh, u.placements, src_data_rank=None)  # local slicing


def _chunk_sizes(length: int, n: int) -> list[int]:
    """Rows per rank of ``torch.chunk(length, n)`` (FSDP2's and DTensor's ``Shard``): ceil-sized, the
    last ones shorter or empty."""
    c = -(-length // n)
    return [max(0, min(c, length - i * c)) for i in range(n)]


def _orthogonalize_on_owner(u: Tensor, steps: int, dtype: torch.dtype, owner: int) -> Tensor:
    """``gather`` the shards (padded to one size) on ``owner``, Newton–Schulz there, ``scatter`` back."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh, dim = u.device_mesh, u.placements[0].dim
    group, me = mesh.get_group(), mesh.get_local_rank()
    sizes = _chunk_sizes(u.shape[dim], mesh.size())
    local = u.to_local()

    def padded(t: Tensor) -> Tensor:  # every piece the size of the largest chunk, for the collectives
        shape = list(t.shape)
        shape[dim] = sizes[0] - t.shape[dim]
        return torch.cat([t, t.new_zeros(shape)], dim=dim).contiguous() if shape[dim] else t.contiguous()

    mine = padded(local)
    src = dist.get_global_rank(group, owner)
    pieces = [torch.empty_like(mine) for _ in sizes] if me == owner else None
    collectives.gather(mine, pieces, dst=src, group=group)
    slices = None
    if me == owner:
        full = newton_schulz(torch.cat([pc.narrow(dim, 0, n) for pc, n in zip(pieces, sizes)], dim=dim),
                             steps, dtype=dtype)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        slices = [padded(full.narrow(dim, a, n)) for a, n in zip(starts, sizes)]
    out = torch.empty_like(mine)
    collectives.scatter(out, slices, src=src, group=group)
    return DTensor.from_local(out.narrow(dim, 0, local.shape[dim]), mesh, u.placements, run_check=False,
                              shape=u.shape, stride=u.stride())


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked ``muon=True``, AdamW for the others (see the module docstring).

    Group keys: lr, weight_decay (decoupled, both rules); Muon groups also momentum, nesterov, ns_steps,
    lr_adjust, ns_dtype ("float32" | "bfloat16"), ns_work ("split" | "replicate"); AdamW groups betas,
    eps, fused. Every value is plain data, so the state dict stays JSON-able.
    """

    def __init__(self, groups: list[dict], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = False,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 lr_adjust: str = "match_rms_adamw", ns_dtype: str = "float32", ns_work: str = "split"):
        if lr_adjust not in LR_ADJUST:
            raise ValueError(f"lr_adjust {lr_adjust!r} is not one of {', '.join(LR_ADJUST)}")
        if ns_work not in NS_WORK:
            raise ValueError(f"ns_work {ns_work!r} is not one of {', '.join(NS_WORK)}")
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps, "fused": fused,
                    "muon": False, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                    "lr_adjust": lr_adjust, "ns_dtype": ns_dtype, "ns_work": ns_work}
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g["muon"]:
                bad = [tuple(p.shape) for p in g["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2-D matrices only; got shapes {bad}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        load: dict[int, list[int]] = {}  # mesh size -> Newton–Schulz FLOPs given to each of its ranks so far
        for p in group["params"]:
            if p.grad is None:
                continue
            owner, ranks = None, ranks_sharing(p) if group["ns_work"] == "split" else None
            if ranks:  # the least-loaded rank takes this matrix: the same choice on every rank
                work = load.setdefault(ranks, [0] * ranks)
                owner = min(range(ranks), key=work.__getitem__)
                work[owner] += ns_flops(tuple(p.shape), group["ns_steps"])
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            u = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            o = orthogonalize(u, group["ns_steps"], getattr(torch, group["ns_dtype"]), owner)
            if wd:
                p.mul_(1.0 - lr * wd)
            p.add_(o, alpha=-lr * lr_scale(p.shape, group["lr_adjust"]))

    def _adamw_step(self, group: dict) -> None:
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        fused = bool(group["fused"])
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # like torch.optim.AdamW: a float32 step counter (on the device for the fused kernel)
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None, fused=fused or None,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


__all__ = ["LR_ADJUST", "NS_COEFFICIENTS", "NS_WORK", "MuonAdamW", "lr_scale", "newton_schulz", "ns_flops",
           "orthogonalize", "ranks_sharing"]
