"""Execution engines for ``prepare``: run ``process_task`` over the ordered tasks, results in task order.

``prepare`` cuts its inputs into tasks and consumes the results in the main process *in task order*
(dedup, val split, shard writing), so the engine decides only *where* ``process_task`` runs:

- ``local``: in-process (``workers=1``) or a pool of ``workers`` spawned processes on this machine;
- ``ray``: Ray tasks on a Ray cluster (``lmforge/data/ray_engine.py``): a local one started for the run, or
  the cluster at ``ray_address`` (``auto`` inside ``ray job submit``).

Every engine keeps at most ``2·workers + 2`` tasks in flight, so memory stays flat however large the
input is, and returns results in submission order, so the shards are byte-identical across engines.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from lmforge.config import UserError

ENGINES = ("local", "ray")


def in_flight_limit(workers: int) -> int:
    """Tasks submitted but not yet consumed: enough to keep every worker busy while the main process
    writes, few enough that memory does not grow with the input."""
    return 2 * workers + 2


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


class LocalEngine:
    """``workers`` spawned processes on this machine (or none: ``workers=1`` runs in-process)."""

    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = workers
        self.pool = None

    def map_ordered(self, fn: Callable[[Any, Any], Any], tasks: Iterable[Any], cfg: Any) -> Iterator[Any]:
        if self.workers == 1:
            for task in tasks:
                yield fn(task, cfg)
            return
        import multiprocessing as mp

        self.pool = mp.get_context("spawn").Pool(self.workers, initializer=_init_worker)
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(self.pool.apply_async(fn, (task, cfg)))
            while len(pending) >= in_flight_limit(self.workers):
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        self.pool.close()
        self.pool.join()
        self.pool = None

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": self.workers}

    def close(self, failed: bool = False) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def make_engine(name: str, workers: int = 1, ray_address: str | None = None):
    """The engine called ``name``; a bad name or an address without ``ray`` is a one-line UserError."""
    if name not in ENGINES:
        raise UserError(f"--engine={name!r} is not one of {', '.join(ENGINES)}")
    if name == "local":
        if ray_address:
            raise UserError("--ray-address needs --engine ray")
        return LocalEngine(workers)
    from lmforge.data.ray_engine import RayEngine  # lazy: cycle, data.ray_engine imports in_flight_limit

    return RayEngine(workers, ray_address)
