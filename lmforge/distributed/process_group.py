"""Process group set-up from torchrun's environment: nccl on CUDA, gloo on CPU.

`init_distributed` is safe to call in a plain single process (no torchrun): it then returns a
one-rank `DistInfo` without creating a process group, so the same trainer code runs everywhere.
Under torchrun (even with one process) a real process group is created, which FSDP2 needs.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lmforge.config import UserError
from lmforge.distributed import collectives
from lmforge.distributed.watchdog import Watchdog


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: no process group (plain single process)
    watchdog: Any = None  # lmforge.distributed.watchdog.Watchdog when world_size > 1
    in_run: bool = False  # a run (`World`) is using the group: not destroyed at exit (see `destroy_at_exit`)

    @property
    def initialized(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """True when torchrun (or an equivalent launcher) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise UserError(f"environment variable {name} is not set; launch with torchrun --nproc_per_node N")
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} must be an integer (set by torchrun)") from None


def init_distributed(timeout_s: float = 600.0, device: str | None = None, watchdog: bool = True) -> DistInfo:
    """Join the job torchrun started, or describe a single process when there is none.

    device: "cuda" / "cpu" / None (CUDA when available). The process-group timeout bounds every
    collective; with ``watchdog`` (the default) a heartbeat thread also makes this rank exit, naming
    the culprit, within ``timeout_s`` of another rank dying (see `lmforge.distributed.watchdog`).
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' requested but CUDA is not available; use device=cpu")
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        dev = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
        return DistInfo(device=dev)
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed; install a standard torch wheel")
    for key in _ENV_KEYS[3:]:
        if key not in os.environ:
            raise UserError(f"environment variable {key} is not set; launch with torchrun --nproc_per_node N")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    timeout = datetime.timedelta(seconds=float(timeout_s))
    pg_kwargs = _attempt_store(rank, world, timeout)
    if want_cuda:
        dev = cuda_device(local_rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", timeout=timeout, device_id=dev, **pg_kwargs)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout, **pg_kwargs)
        backend = "gloo"
    info = DistInfo(rank, world, local_rank, dev, backend)
    if watchdog and world > 1:
        info.watchdog = Watchdog.start(rank, world, timeout_s)
    global _CURRENT
    _CURRENT = info
    return info


_CURRENT: DistInfo | None = None


def cuda_device(local_rank: int) -> torch.device:
    """This rank's GPU: ``cuda:LOCAL_RANK``, or ``cuda:0`` when the launcher gave each rank its own single
    visible device (CUDA_VISIBLE_DEVICES set per rank, e.g. Slurm's ``--gpus-per-task=1``), so LOCAL_RANK
    counts past the one device this process sees."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise UserError(f"LOCAL_RANK={local_rank} but only {count} CUDA devices are visible; use --nproc_per_node "
                    f"<= {count}, or give each rank one device with CUDA_VISIBLE_DEVICES")


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """Under torchrun's shared agent store, a per-restart-attempt namespace for the process group.

    torchrun (c10d rendezvous) lets workers share its agent's TCPStore across restarts without a
    per-attempt prefix, so a restarted rank can read a peer's address from the failed attempt and
    fail to connect (pytorch/pytorch#135712). Keys under ``/lmforge/attempt_<n>`` cannot be stale.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    base = dist.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), world, is_master=False,
                         timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"/lmforge/attempt_{attempt}", base), "rank": rank, "world_size": world}


def current() -> DistInfo:
    """The DistInfo of this process (a one-rank CPU/CUDA description when no group exists)."""
    if _CURRENT is not None and dist.is_initialized():
        return _CURRENT
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistInfo(rank, world, int(os.environ.get("LOCAL_RANK", "0")), dev, backend)
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(device=dev)


def barrier() -> None:
    collectives.barrier()


def shutdown_distributed(info: DistInfo | None = None) -> None:
    """Stop the watchdog (marking this rank done), then destroy the process group."""
    global _CURRENT
    info = info or _CURRENT
    if info is not None and info.watchdog is not None:
        info.watchdog.stop()
        info.watchdog = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None


def destroy_at_exit(info: DistInfo) -> None:
    """Destroy ``info``'s process group when the interpreter exits, unless a run is still using it.

    Several runs may share one process group (a script calling `pretrain` twice), so the end of a run
    leaves it; at exit it is shut down (watchdog, then `destroy_process_group`), so NCCL's communicators
    are released instead of leaked. A run that failed (``in_run`` still set) is left alone: destroying an
    NCCL group with a collective still pending on a dead peer would hang the exit.
    """
    atexit.register(_destroy_if_idle, info)


def _destroy_if_idle(info: DistInfo) -> None:
    if not info.in_run and dist.is_available() and dist.is_initialized() and _CURRENT is info:
        shutdown_distributed(info)


def all_reduce_mean(value: float | torch.Tensor, group=None) -> float:
    """Mean of a scalar over ranks (the value itself when no process group exists)."""
    t = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    if not (dist.is_available() and dist.is_initialized()):
        return float(t)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t = collectives.all_reduce(t.to(dev), "sum", group)
    return float(t) / dist.get_world_size(group)
