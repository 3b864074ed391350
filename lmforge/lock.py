"""One writer per output: an advisory lock file held while a command writes.

A run dir is locked through ``DIR/.lmforge.lock`` for the whole life of ``pretrain`` / ``finetune`` /
``quickstart`` (:func:`lmforge.outputs.run_dir_claim`); a one-shot output dir (``prepare --out``, ``export
--out``) through a sibling ``.OUT.lock`` while it is built and renamed into place (the dir itself does not
exist yet). The lock is ``fcntl.flock`` on that file, which holds one JSON object naming the holder::

    {"pid": 1234, "host": "node7", "command": "lmforge pretrain", "started": "2026-12-07T20:51:52Z"}

* A second writer is refused at once (:class:`Locked`, a one-line :class:`~lmforge.config.UserError`, exit
  2) naming the holder: pid, host, command and since when.
* The kernel drops a flock when its process dies, so a lock file that is present but whose flock can be
  taken was left by a process that died (``kill -9``, a crash, a lost node): it is taken over with a
  one-line note naming that process.
* A holder removes the file when it finishes (while still holding the flock); a writer that took the flock
  checks that the path still names the file it locked, so it never holds a lock on a removed file.
* In one process the lock is re-entrant (``quickstart`` holds its dir while the steps inside it run).

The lock is advisory: it keeps lmforge writers apart, not other programs. On a filesystem without working
``flock`` (some network mounts) the command goes on with a one-line warning.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.config import UserError

LOCK_NAME = ".lmforge.lock"
WAIT_S = 1.0  # a flock held for a moment (a reader's probe, a holder still writing its JSON) is waited out
_MAX_READ = 65536


class Locked(UserError):
    """Another live process holds the lock: one line naming it (pid, host, command, since when)."""


def run_dir_lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(run_dir)))) / LOCK_NAME


def output_lock_path(out: str | os.PathLike) -> Path:
    """``PARENT/.NAME.lock`` for an output dir ``PARENT/NAME`` that is built beside itself and renamed."""
    p = Path(os.path.abspath(os.path.expanduser(str(out))))
    return p.with_name(f".{p.name}.lock")


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, _MAX_READ, 0)
        holder = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return holder if isinstance(holder, dict) and holder.get("pid") is not None else None


def _since(started: object) -> str:
    try:
        t = _dt.datetime.strptime(str(started), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return f"since {started}"
    age = int((_dt.datetime.now(_dt.timezone.utc) - t).total_seconds())
    ago = f"{age}s" if age < 120 else f"{age // 60} min" if age < 7200 else f"{age // 3600} h"
    return f"since {t.strftime('%Y-%m-%d %H:%M:%S')} UTC ({ago} ago)"


def describe_holder(holder: dict | None) -> str:
    """``pid 1234 on node7 (lmforge pretrain, since 2026-12-07 20:51:52 UTC (5s ago))``."""
    if holder is None:
        return "another process (its lock file names no holder yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host', '?')} "
            f"({holder.get('command', '?')}, {_since(holder.get('started'))})")


def _pid_alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


class OutputLock:
    """A held lock; :meth:`release` (idempotent) removes the file and drops the flock."""

    def __init__(self, path: Path, fd: int | None, what: str) -> None:
        self.path, self.fd, self.what = path, fd, what
        self.depth = 1
        self.pid = os.getpid()

    def release(self) -> None:
        if self.fd is None:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        fd, self.fd = self.fd, None
        _HELD.pop(str(self.path), None)
        try:
            if self.pid == os.getpid():  # a forked child never removes its parent's lock
                st, mine = os.stat(self.path), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    os.unlink(self.path)
        except OSError:
            pass  # already gone (the whole dir was removed)
        finally:
            os.close(fd)


_HELD: dict[str, OutputLock] = {}


def acquire(path: str | os.PathLike, command: str, what: str, fix: str) -> OutputLock:
    """Take the lock file ``path`` for ``command``; ``what`` names the output in messages (``run.dir='r'``)
    and ``fix`` says what to do instead (``choose another run.dir``). Raises :class:`Locked`."""
    path = Path(os.path.abspath(str(path)))
    held = _HELD.get(str(path))
    if held is not None and held.fd is not None and held.pid == os.getpid():
        held.depth += 1
        return held
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}: cannot create '{path.parent}' ({e.strerror}); choose a directory you own") from None
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"{what}: cannot create the lock file '{path}' ({e.strerror}); "
                            "choose a directory you own") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this filesystem
                os.close(fd)
                print(f"warning: {what}: cannot lock '{path}' ({e.strerror}); a second lmforge writing it at "
                      "the same time would not be detected", file=sys.stderr, flush=True)
                return OutputLock(path, None, what)
            holder = _read_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if holder is not None and holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"]):
                raise Locked(f"{what} is still locked by a process that {describe_holder(holder)} started, though "
                             f"pid {holder['pid']} has exited; find it with `fuser {path}` and stop it, or {fix}") from None
            raise Locked(f"{what} is being written by {describe_holder(holder)}; wait for it to finish or stop "
                         f"it, or {fix}") from None
        try:  # a holder that finished removed the file: lock the one now at `path`
            st, mine = os.stat(path), os.fstat(fd)
            same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_holder(fd)
    if stale is not None:
        gone = ("which is no longer running" if stale.get("host") == socket.gethostname()
                and not _pid_alive(stale.get("pid")) else "which no longer holds it")
        print(f"note: {what}: taking over the stale lock '{path}' left by {describe_holder(stale)}, {gone}",
              file=sys.stderr, flush=True)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                         "started": _now_iso()}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode("utf-8"), 0)
    except OSError as e:
        os.close(fd)
        raise UserError(f"{what}: cannot write the lock file '{path}' ({e.strerror}); free some disk space") from None
    lock = OutputLock(path, fd, what)
    _HELD[str(path)] = lock
    return lock


@contextlib.contextmanager
def locked(path: str | os.PathLike, command: str, what: str, fix: str) -> Iterator[OutputLock]:
    """``with locked(path, command, what, fix):`` hold the lock file ``path`` (see :func:`acquire`)."""
    lock = acquire(path, command, what, fix)
    try:
        yield lock
    finally:
        lock.release()


def holder_of(path: str | os.PathLike) -> dict | None:
    """The holder of lock file ``path`` while a live process holds it, else None. Probes with a shared flock
    dropped at once (a writer starting at that instant waits it out, see ``WAIT_S``)."""
    path = Path(os.path.abspath(str(path)))
    held = _HELD.get(str(path))
    if held is not None and held.fd is not None and held.pid == os.getpid():
        return None  # this process writes it
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return _read_holder(fd) or {}
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_not_being_written(directory: str | os.PathLike, flag: str) -> None:
    """Refuse to read ``directory`` (e.g. ``export --model RUN/model``) while an lmforge writer holds it or
    the run dir it lies in: the writer replaces it (RUN/model is rewritten when a run ends)."""
    d = Path(os.path.abspath(os.path.expanduser(str(directory))))
    for lock_file, owner in ((d / LOCK_NAME, d), (d.parent / LOCK_NAME, d.parent), (output_lock_path(d), d)):
        holder = holder_of(lock_file)
        if holder is not None:
            where = "" if owner == d else f" lies in the run dir '{owner}', which"
            raise Locked(f"{flag} '{directory}'{where} is being written by {describe_holder(holder or None)}, "
                         f"which replaces it; wait for that command to finish, then run this again")
