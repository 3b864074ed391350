"""The engine thread: the one owner of the model. Requests wait in a bounded queue, join the running batch
when a slot frees, and leave it when they finish or their client goes away.

Each loop: drop cancelled sequences, hand waiting requests to the batcher while it has free slots, then one
engine step (`ContinuousBatcher.step`: admission by free KV blocks, prompt chunks and one batched decode). Results go back through each job's ``sink`` (called on the engine thread; the HTTP
side hands them to its event loop). ``submit`` refuses with `QueueFull` (HTTP 429) when the queue is full and
`Unavailable` (HTTP 503) once the server is shutting down or the engine has died.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.generate.batcher import ContinuousBatcher, Sequence, Update

log = logging.getLogger("lmforge.serve")


class QueueFull(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass(eq=False)
class Job:
    seq: Sequence
    sink: Callable[[Update | BaseException], None]
    cancelled: bool = False


class Scheduler:
    def __init__(self, batcher: ContinuousBatcher, max_queue: int = 64):
        self.batcher = batcher
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}  # seq id -> job, touched by the engine thread only
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()  # held while the engine works; `paused` waits on it
        self._paused = False
        self._stopping = False
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "steps": 0}

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, fail what is queued or running with `Unavailable`, and end the engine thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_all(Unavailable("the server is shutting down"))

    @contextlib.contextmanager
    def paused(self):
        """Hold the engine between steps (requests still queue; nothing is prefilled or decoded)."""
        with self._cv:
            self._paused = True
        with self._step_lock:  # the step in progress (if any) ends first
            pass
        try:
            yield self
        finally:
            with self._cv:
                self._paused = False
                self._cv.notify_all()

    # ---- requests (any thread) ------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` (all or none)."""
        with self._cv:
            if self._stopping or self._dead:
                raise Unavailable(self._dead or "the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            self._pending.extend(jobs)
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: free the job's slot before the next step (or drop it from the queue)."""
        with self._cv:
            if job.cancelled:
                return
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self.counts["cancelled"] += 1  # under the lock, like every count
            self._cv.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cv:
            return {"active": len(self.batcher.active), "queued": len(self._pending),
                    "slots": self.batcher.n_slots, "max_queue": self.max_queue, **self.counts}

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._stopping

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopping and (self._paused or not (self._pending or self._active)):
                        self._cv.wait()
                    if self._stopping:
                        return
                    self._step_lock.acquire()
                    gone = [j for j in self._active.values() if j.cancelled]
                    admit = []
                    while self._pending and len(admit) < self.batcher.free_slots + len(gone):
                        admit.append(self._pending.popleft())
                try:
                    self._iterate(gone, admit)
                finally:
                    self._step_lock.release()
        except BaseException as e:  # the engine cannot go on (a bug, a lost device): every request gets a 503
            log.exception("engine thread died")
            self._dead = f"the model engine stopped: {type(e).__name__}: {e}"
            self._fail_all(Unavailable(self._dead))

    def _iterate(self, gone: list[Job], admit: list[Job]) -> None:
        for job in gone:
            self.batcher.remove(job.seq, "cancelled")
            del self._active[job.seq.id]
            self._count("cancelled")
        for job in admit:
            if job.cancelled:
                continue
            try:
                self.batcher.add(job.seq)
            except Exception as e:  # noqa: BLE001 — this request's fault: it alone fails
                self._count("failed")
                job.sink(e)
                continue
            self._active[job.seq.id] = job
        if not self.batcher.active:
            return
        try:
            updates = self.batcher.step()
        except Exception as e:  # a failed step fails the requests in the batch; the engine goes on
            log.exception("engine step failed")
            for job in list(self._active.values()):
                self.batcher.remove(job.seq, "error")
                self._count("failed")
                job.sink(e)
            self._active.clear()
            return
        self._count("steps")
        for u in updates:
            self._deliver(self._active[u.seq.id], u)

    def _count(self, key: str) -> None:
        with self._cv:
            self.counts[key] += 1

    def _deliver(self, job: Job, update: Update) -> None:
        if update.finished:
            self._active.pop(job.seq.id, None)
            self._count("served")
        if not job.cancelled:
            try:
                job.sink(update)
            except Exception:  # the client's event loop is gone; the job is cancelled
                log.debug("sink failed", exc_info=True)
                job.cancelled = True

    def _fail_all(self, error: BaseException) -> None:
        with self._cv:
            jobs = list(self._pending) + list(self._active.values())
            self._pending.clear()
        self._active.clear()
        for job in jobs:
            with contextlib.suppress(Exception):
                job.sink(error)
