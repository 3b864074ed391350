"""A small progress bar on stderr: redrawn in place on a terminal, a line every ~10% otherwise (logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, stream=None, enabled: bool = True):
        self.total, self.desc, self.n = max(int(total), 0), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def _line(self) -> str:
        frac = self.n / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        dt = time.perf_counter() - self.t0
        rate = self.n / dt if dt > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        return f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f}/s eta {eta:.0f}s"

    def update(self, k: int = 1) -> None:
        self.n = min(self.n + k, self.total) if self.total else self.n + k
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_draw > 0.1 or self.n >= self.total:
                self._last_draw = now
                print("\r" + self._line(), end="", file=self.stream, flush=True)
        else:
            decile = int(10 * self.n / self.total) if self.total else 10
            if decile > self._last_decile:
                self._last_decile = decile
                print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)
