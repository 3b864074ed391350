"""Failure behaviour: when one rank dies, the others exit within the timeout and say which rank it was.

A collective on a dead peer either fails with a transport error that does not name the peer
(gloo: "Connection closed by peer") or blocks until the process-group timeout (nccl). So every
rank runs a small daemon thread that talks to the job's rendezvous store (the one torchrun or
`init_process_group` created):

- it bumps ``hb/<rank>`` every ``interval`` seconds and reads everybody else's counter;
- each rank watches its ring successor (the next unfinished rank): one whose counter has not
  moved for ``dead_after`` (= timeout_s / 2) seconds, or whose process is gone (same host:
  /proc/<pid>), is reported through a shared ``alarm`` key that every rank polls; a rank that
  fails with an exception posts the alarm itself;
- this rank then prints one line naming the culprit to stderr and exits with code 75
  (EX_TEMPFAIL), which `torchrun --max-restarts` treats like any failure: it restarts the group,
  and ``train.resume=auto`` continues from the last complete checkpoint.

`Watchdog.guard()` wraps the training loop: a local exception is posted to the store before it
propagates (so peers name it at once), and a collective error caused by a peer waits briefly for
the thread to identify that peer instead of blaming this rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

EXIT_PEER_FAILED = 75

_PEER_ERROR_HINTS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo",
                     "nccl", "socket", "peer", "watchdog", "abort")


def _pid_gone(pid: int) -> bool:
    """True when no live process has this pid on this host (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    # /proc/<pid>/stat: "pid (comm) S ..."; comm may contain spaces, so split after the last ')'.
    state = stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3]
    return state in (b"Z", b"X")


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class Watchdog:
    """Heartbeat thread for one rank; construct with :meth:`start`."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float,
                 interval: float | None = None, on_failure: Callable[[str], None] | None = None):
        import torch.distributed as dist

        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"lmforge/watchdog/{attempt}", store)
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.dead_after = self.timeout_s / 2
        self.interval = interval if interval is not None else max(0.05, min(1.0, self.timeout_s / 10))
        self.host = socket.gethostname()
        self._on_failure = on_failure or self._exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_value = [0] * world_size
        self._last_change = [time.monotonic()] * world_size
        self._peer_info: dict[int, dict] = {}
        self.culprit: str | None = None  # set once a failure has been identified

    @classmethod
    def start(cls, rank: int, world_size: int, timeout_s: float, store=None, **kwargs) -> Watchdog:
        wd = cls(store if store is not None else _default_store(), rank, world_size, timeout_s, **kwargs)
        wd.store.set(f"info/{rank}", json.dumps({"host": wd.host, "pid": os.getpid()}))
        wd._launch()
        return wd

    def _launch(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"lmforge-watchdog-{self.rank}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def resume(self) -> None:
        """Watch again after `stop()` (a second run in the same process): un-mark done, restart the thread."""
        if self.running:
            return
        if self.store.add(f"done/{self.rank}", 0) > 0:
            self.store.add(f"done/{self.rank}", -1)
        now = time.monotonic()
        self._last_change = [now] * self.world_size
        self._launch()

    # ---- thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        store_errors = 0
        while not self._stop.wait(self.interval):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                problem = self.check_peers()
                store_errors = 0
            except Exception as e:  # noqa: BLE001 - any store failure: it lives in rank 0 or torchrun's agent
                if self._stop.is_set():
                    return
                store_errors += 1
                if store_errors * self.interval < min(self.dead_after, 5.0) and store_errors < 50:
                    continue
                host = os.environ.get("MASTER_ADDR", "?")
                port = os.environ.get("MASTER_PORT", "?")
                owner = ("the torchrun agent" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                         else "rank 0")
                problem = (f"lost the job's rendezvous store at {host}:{port} (hosted by {owner}); "
                           f"{owner} probably died ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if problem and not self._stop.is_set():
                self.culprit = problem
                self._on_failure(problem)
                return

    def _peer(self, r: int) -> dict:
        if r not in self._peer_info and self.store.check([f"info/{r}"]):
            self._peer_info[r] = json.loads(self.store.get(f"info/{r}"))
        return self._peer_info.get(r, {})

    def check_peers(self) -> str | None:
        """One pass: the job-wide alarm, then this rank's ring successor. A description of a failure, else None.

        Each rank watches only the next unfinished rank (O(1) store traffic per rank at any world
        size) and raises the shared alarm when it finds it dead; every rank polls the alarm.
        """
        if self.store.add("alarm", 0) > 0:
            return self.store.get("alarmmsg").decode(errors="replace")
        now = time.monotonic()
        for step in range(1, self.world_size):
            r = (self.rank + step) % self.world_size
            if self.store.add(f"done/{r}", 0) > 0:  # finished cleanly: watch the next one
                continue
            info = self._peer(r)
            where = f" (host {info.get('host')}, pid {info.get('pid')})" if info else ""
            value = self.store.add(f"hb/{r}", 0)
            if value != self._last_value[r]:
                self._last_value[r], self._last_change[r] = value, now
                return None
            silent = now - self._last_change[r]
            problem = None
            if info and info.get("host") == self.host and silent >= 2 * self.interval and _pid_gone(info["pid"]):
                problem = f"rank {r}{where} died (its process is gone)"
            elif silent >= self.dead_after:
                what = "sent no heartbeat" if value == 0 else "stopped sending heartbeats"
                problem = f"rank {r}{where} {what} for {silent:.0f}s (parallel.timeout_s={self.timeout_s:g})"
            if problem:
                self._raise_alarm(problem)
            return problem
        return None

    def _raise_alarm(self, problem: str) -> None:
        self.store.set("alarmmsg", problem[:1000])
        self.store.add("alarm", 1)

    def _exit(self, problem: str) -> None:
        print(f"error: {problem}; rank {self.rank} exits (code {EXIT_PEER_FAILED}) so the job can restart",
              file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_PEER_FAILED)

    # ---- main thread ---------------------------------------------------------------------------
    def report_failure(self, message: str) -> None:
        """Tell the peers this rank is failing (they exit naming it) — call before re-raising."""
        info = f" (host {self.host}, pid {os.getpid()})"
        self._stop.set()  # this rank's own thread must not act on its own alarm
        with contextlib.suppress(Exception):
            self._raise_alarm(f"rank {self.rank}{info} failed: {message[:500]}")

    def wait_for_culprit(self, max_wait_s: float | None = None) -> str | None:
        """Block until the thread has identified a failed peer (it then exits the process) or time runs out."""
        deadline = time.monotonic() + (max_wait_s if max_wait_s is not None else self.dead_after + 3 * self.interval)
        while time.monotonic() < deadline and self.culprit is None:
            time.sleep(min(0.05, self.interval))
        return self.culprit

    @contextlib.contextmanager
    def guard(self):
        """Run the training loop inside this: see the module docstring. On success this rank is marked
        finished (peers stop watching it, so its exit is not mistaken for a crash)."""
        self.resume()
        try:
            yield self
            self.stop()
        except BaseException as e:
            text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if _looks_like_peer_failure(e) and self.wait_for_culprit() is not None:
                raise  # the thread already exited the process; only reached with a custom on_failure
            if not isinstance(e, (KeyboardInterrupt, SystemExit)) or getattr(e, "code", 1):
                self.report_failure(text)
            raise

    def stop(self) -> None:
        """Mark this rank finished (peers stop watching it) and end the thread."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self.store.add(f"done/{self.rank}", 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.interval))


def _looks_like_peer_failure(e: BaseException) -> bool:
    try:
        import torch.distributed as dist

        if isinstance(e, dist.DistError):
            return True
    except (ImportError, AttributeError):
        pass
    if isinstance(e, (RuntimeError, ConnectionError, TimeoutError)):
        text = str(e).lower()
        return any(h in text for h in _PEER_ERROR_HINTS)
    return False
