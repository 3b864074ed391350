"""Decisions every rank must take together, and the signals that ask a run to stop.

A decision that leads to collectives (evaluate, checkpoint, stop) taken by one rank alone hangs the
job: one rank enters the checkpoint's all-gathers while another starts a step. So each rank states
its local view as numbers and :func:`agree` takes their maximum over the whole world (one small
all-reduce): if any rank saw SIGTERM, hit the time limit or wants to stop early, every rank stops at
the same step.

Signals: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) only set a flag here; the loop
checkpoints collectively and the CLI exits with 128 + the signal number (130 / 143), so
``lmforge pretrain && lmforge export`` never exports a half-trained model.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence

import torch

from lmforge.distributed import collectives

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_TIME_LIMIT = 124  # as GNU `timeout`: the run stopped at train.time_limit_minutes; re-run to continue


def agree(values: Sequence[float]) -> list[float]:
    """The element-wise maximum of ``values`` over every rank of the job (TP peers included)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if collectives.initialized():
        if "cpu" not in collectives.expected_device_types():
            t = t.cuda()
        collectives.all_reduce(t, "max")
    return t.cpu().tolist()


def exit_code(stop_reason: str, signum: int = 0) -> int:
    """The CLI's exit status for a run that ended with ``stop_reason`` (0 = finished)."""
    if stop_reason == "signal":
        return 128 + signum
    if stop_reason == "time_limit":
        return EXIT_TIME_LIMIT
    return 0


class StopSignals:
    """Installs handlers for SIGINT/SIGTERM/SIGUSR1 that record the signal instead of acting on it.

    ``with StopSignals() as sigs: ... sigs.signum`` (0 until a signal arrives). The previous handlers
    come back on exit. Outside the main thread (no handlers can be installed) it records nothing.
    """

    def __init__(self):
        self.signum = 0
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        self.signum = self.signum or int(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        self._old.clear()

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


__all__ = ["EXIT_TIME_LIMIT", "StopSignals", "agree", "exit_code"]
