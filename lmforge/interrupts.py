"""SIGTERM as an exception: a command killed by ``kill`` / a scheduler's preemption unwinds through its
``except``/``finally`` cleanup (temp dirs of atomic writes are removed) and exits 143, like Ctrl-C does
through ``KeyboardInterrupt`` (exit 130). The training loop installs its own handler while it runs (a
collective, checkpointed stop) and restores this one after."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_SIGTERM = 143


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM; exits 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_SIGTERM)


@contextlib.contextmanager
def sigterm_raises(message: str = "error: terminated (SIGTERM); nothing half-written was left") -> Iterator[None]:
    """While active, SIGTERM prints ``message`` (stderr) and raises `Terminated` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        print(message, file=sys.stderr, flush=True)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not settable here (embedded interpreter): leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
