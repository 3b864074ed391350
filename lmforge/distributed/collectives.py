"""The tensor collectives lmforge runs, each checking that its tensor lives where the group's backend works.

NCCL reduces CUDA tensors only and gloo (here) CPU tensors only; a tensor on the other device fails deep in
the backend (or, worse, only on the GPU machine). Every tensor collective in the package goes through these
wrappers (a test fails on a direct ``dist.all_reduce`` elsewhere), so a CPU tensor handed to an NCCL group
raises one line naming the collective, the device it got and the device it needs.

Each call is a no-op without a process group, so the same code runs in a plain single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
_BACKEND_DEVICES = {"nccl": "cuda", "gloo": "cpu", "xccl": "xpu"}


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its process group's backend does not reduce."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def expected_device_types(group=None) -> frozenset[str]:
    """Device types the backend of ``group`` (None: the default group) takes: cuda for nccl, cpu for gloo.

    A multi-backend group (``"cpu:gloo,cuda:nccl"``) takes each of its devices."""
    backend = str(dist.get_backend(group)).lower()
    types = set()
    for part in backend.split(","):
        device, _, name = part.rpartition(":")
        types.add(device or _BACKEND_DEVICES.get(name, name))
    return frozenset(types)


def check_device(t: torch.Tensor, what: str, group=None) -> None:
    """Raise CollectiveDeviceError unless ``t`` sits on a device ``group``'s backend reduces."""
    want = expected_device_types(group)
    if t.device.type not in want:
        backend = dist.get_backend(group)
        raise CollectiveDeviceError(
            f"{what} over a {backend} process group got a tensor on {t.device.type} ({tuple(t.shape)}, "
            f"{t.dtype}); {backend} needs {' or '.join(sorted(want))} tensors: create it on the run's device "
            f"(World.device)")


def _op(op: str):
    if op not in _OPS:
        raise ValueError(f"reduction op {op!r} is not one of {', '.join(_OPS)}")
    return getattr(dist.ReduceOp, _OPS[op])


def all_reduce(t: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of ``t`` over ``group`` (None: every rank); ``t`` itself without a group."""
    if initialized():
        check_device(t, "all_reduce", group)
        dist.all_reduce(t, op=_op(op), group=group)
    return t


def gather(t: torch.Tensor, gather_list: list[torch.Tensor] | None, dst: int, group=None) -> None:
    """``dist.gather`` (``dst`` a global rank) with the device check on every tensor involved."""
    for x in [t, *(gather_list or [])]:
        check_device(x, "gather", group)
    dist.gather(t, gather_list, dst=dst, group=group)


def scatter(t: torch.Tensor, scatter_list: list[torch.Tensor] | None, src: int, group=None) -> None:
    """``dist.scatter`` (``src`` a global rank) with the device check on every tensor involved."""
    for x in [t, *(scatter_list or [])]:
        check_device(x, "scatter", group)
    dist.scatter(t, scatter_list, src=src, group=group)


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)
