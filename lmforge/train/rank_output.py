"""Print once: a multi-rank run's summary comes from rank 0 only; its errors from any rank, naming it.

Under torchrun every rank runs the same CLI command; without this each prints the summary line, and
an error line does not say which rank raised it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from lmforge.config import UserError
from lmforge.console import emit, info


def process_rank() -> int | None:
    """This process's global rank in a multi-process job, or None for a single process."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() if dist.get_world_size() > 1 else None
    except ImportError:
        pass
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return int(os.environ.get("RANK", "0") or 0)
    return None


def emit_once(args: Any, summary: str, payload: dict[str, Any] | None = None) -> None:
    """`lmforge.console.emit` on rank 0 (or a single process) only."""
    if process_rank() in (None, 0):
        emit(args, summary, payload)


def note(message: str) -> None:
    """`lmforge.console.info` on rank 0 (or a single process) only: a note every rank would repeat."""
    if process_rank() in (None, 0):
        info(message)


@contextlib.contextmanager
def errors_name_rank():
    """A UserError raised inside reads ``rank N: …`` in a multi-process job (the CLI prints ``error: …``)."""
    try:
        yield
    except UserError as e:
        rank = process_rank()
        if rank is not None and e.args and not str(e.args[0]).startswith("rank "):
            e.args = (f"rank {rank}: {e.args[0]}", *e.args[1:])
        raise


__all__ = ["emit_once", "errors_name_rank", "note", "process_rank"]
