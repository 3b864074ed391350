"""Reading RUN/metrics.jsonl for the dashboard: an incremental reader that remembers where it stopped.

:class:`MetricsReader` reads a metrics file from a byte offset onward, one bounded chunk per call, and keeps:

* a cursor (inode, byte offset of the next unread line, lines read, garbage lines skipped, the cumulative
  training time and the step it was taken at), so the next read starts where the last stopped — a file is
  never reread as a whole per event;
* bounded series (``max_points`` per kind): when a kind's kept rows reach twice the bound, every other one is
  dropped and the stride doubles, so a 1 GB file becomes a few thousand points (the last row is always kept);
* the figures the runs list needs (last train row, last and best validation loss / bits per byte, total steps,
  the events: start, resume, end, spike, nonfinite).

A line that is not a JSON object (garbage, a half-written line from a kill) is skipped and counted. A last
line without its newline is left unread until the writer finishes it. The trainer rewrites the file on a
resume or a spike rollback (``MetricsWriter.truncate_after``: an atomic replace, so a new inode with fewer
rows); :meth:`MetricsReader.replaced` sees that (a new inode, or a file shorter than the offset) and the
caller starts over (the live stream sends a ``reset`` event).

Each row handed out carries ``_line`` (its 0-based line number) and ``_t`` (seconds of training so far:
``step_time`` x steps, summed over the run's segments, not counting the time between a stop and a resume).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHUNK_BYTES = 8 << 20  # read per call: bounded work per request whatever the file's size
MAX_LINE_BYTES = 1 << 20  # a longer "line" is garbage; skipped (and counted) without holding it
MAX_POINTS = 2000  # kept rows per kind (train, eval) before halving
MAX_EVENTS = 2000
X_KEYS = ("step", "tokens", "_t", "_line")


@dataclass
class Cursor:
    """Where a reader stands in a file: enough to continue a read (the live stream) in another request."""

    ino: int = 0
    offset: int = 0
    line: int = 0
    bad: int = 0
    t: float = 0.0
    last_step: int = 0
    skip: bool = False  # inside an over-long garbage line: drop bytes up to its newline

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _file_id(st: os.stat_result) -> int:
    return st.st_ino or 1


@dataclass
class MetricsReader:
    path: Path
    cursor: Cursor = field(default_factory=Cursor)
    max_points: int = MAX_POINTS
    keep_series: bool = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self._reset_state()

    def _reset_state(self) -> None:
        self.kinds: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        self.strides: dict[str, int] = {"train": 1, "eval": 1}
        self.seen: dict[str, int] = {"train": 0, "eval": 0}
        self.last: dict[str, dict[str, Any] | None] = {"train": None, "eval": None}
        self.events: list[dict[str, Any]] = []
        self.best: dict[str, tuple[float, int]] = {}  # val key -> (lowest value, its step)
        self.total_steps: int | None = None

    def size(self) -> int | None:
        try:
            return self.path.stat().st_size
        except OSError:
            return None

    def replaced(self) -> bool:
        """The file was rewritten (resume / rollback: a new inode), shrank below the offset, or is gone."""
        try:
            st = self.path.stat()
        except OSError:
            return self.cursor.offset > 0
        if self.cursor.ino and _file_id(st) != self.cursor.ino:
            return True
        return st.st_size < self.cursor.offset

    def restart(self) -> None:
        self.cursor = Cursor()
        self._reset_state()

    def done(self) -> bool:
        size = self.size()
        return size is None or self.cursor.offset >= size

    def read(self, max_bytes: int = CHUNK_BYTES) -> list[dict[str, Any]]:
        """The complete lines after the cursor (at most about ``max_bytes``), parsed; the cursor moves past
        them. Rows that are not JSON objects are skipped and counted in ``cursor.bad``."""
        c = self.cursor
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if c.ino and _file_id(st) != c.ino:
                    return []  # replaced: the caller asks replaced() and restarts
                c.ino = _file_id(st)
                f.seek(c.offset)
                data = f.read(max(max_bytes, MAX_LINE_BYTES + 1))
        except OSError:
            return []
        rows = []
        start = 0
        if c.skip:
            nl = data.find(b"\n")
            if nl < 0:
                c.offset += len(data)
                return rows
            c.skip, start = False, nl + 1
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            rows_line = data[start:nl]
            start = nl + 1
            row = self._parse(rows_line)
            if row is not None:
                rows.append(row)
        if len(data) - start > MAX_LINE_BYTES:
            # a "line" longer than a line's bound: garbage, counted once; its bytes are dropped up to its newline
            c.offset += len(data)
            c.bad += 1
            c.line += 1
            c.skip = True
            return rows
        c.offset += start
        return rows

    def _parse(self, raw: bytes) -> dict[str, Any] | None:
        c = self.cursor
        line = c.line
        c.line += 1
        try:
            row = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_LINE_BYTES else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            if raw.strip():
                c.bad += 1
            return None
        row["_line"] = line
        self._annotate(row)
        self._keep(row)
        return row

    def _annotate(self, row: dict[str, Any]) -> None:
        c = self.cursor
        step = row.get("step")
        step = int(step) if _finite(step) else c.last_step
        kind = row.get("kind")
        if kind == "event" and row.get("event") in ("start", "resume"):
            c.last_step = step  # the time between a stop and a resume is not training time
        elif kind == "train" and step > c.last_step:
            st = row.get("step_time")
            if _finite(st) and st > 0:
                c.t += st * (step - c.last_step)
            c.last_step = step
        row["_t"] = round(c.t, 3)

    def _keep(self, row: dict[str, Any]) -> None:
        kind = row.get("kind")
        if kind == "event":
            if row.get("event") in ("start", "resume") and _finite(row.get("total_steps")):
                self.total_steps = int(row["total_steps"])
            if len(self.events) < MAX_EVENTS:
                self.events.append({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
            return
        if kind not in ("train", "eval"):
            return
        self.last[kind] = row
        if kind == "eval":
            for k, v in row.items():
                if (k.startswith("val_") and k.endswith(("loss", "bpb")) and _finite(v)
                        and (k not in self.best or v < self.best[k][0])):
                    self.best[k] = (v, row.get("step", 0))
        if not self.keep_series:
            return
        n = self.seen[kind]
        self.seen[kind] = n + 1
        if n % self.strides[kind]:
            return
        kept = self.kinds[kind]
        kept.append({k: v for k, v in row.items() if _finite(v) and k != "kind"})
        if len(kept) >= 2 * self.max_points:
            del kept[1::2]
            self.strides[kind] *= 2

    def series(self) -> dict[str, Any]:
        """Per kind: the x columns (step, tokens, _t, _line) and every numeric key as a column (None = absent),
        at most ``2 * max_points`` rows, the last row always included."""
        out = {}
        for kind, kept in self.kinds.items():
            rows = list(kept)
            last = self.last[kind]
            if last is not None and (not rows or rows[-1].get("_line") != last["_line"]):
                rows.append({k: v for k, v in last.items() if _finite(v) and k != "kind"})
            keys = sorted({k for r in rows for k in r} - set(X_KEYS))
            out[kind] = {"x": {x: [r.get(x) for r in rows] for x in X_KEYS},
                         "y": {k: [r.get(k) for r in rows] for k in keys},
                         "rows_seen": self.seen[kind], "stride": self.strides[kind]}
        return out

    def summary(self) -> dict[str, Any]:
        train, ev = self.last["train"], self.last["eval"]
        ends = [e for e in self.events if e.get("event") == "end"]
        starts = [e for e in self.events if e.get("event") in ("start", "resume")]
        end = ends[-1] if ends and (not starts or ends[-1]["_line"] > starts[-1]["_line"]) else None

        def pick(row, keys):
            return {k: row[k] for k in keys if row is not None and _finite(row.get(k))}

        return {
            "step": (train or {}).get("step", starts[-1].get("step") if starts else None),
            "total_steps": self.total_steps,
            "tokens": (train or {}).get("tokens"),
            "last_train": pick(train, ("step", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "step_time",
                                       "mem_gb", "peak_mem_gb")),
            "last_eval": ({k: v for k, v in ev.items() if _finite(v) and not k.startswith("_")} if ev else {}),
            "best": {k: {"value": v, "step": s} for k, (v, s) in sorted(self.best.items())},
            "end": end,
            "segments": len(starts),
            "events": len(self.events),
            "bad_lines": self.cursor.bad,
            "lines": self.cursor.line,
            "bytes_read": self.cursor.offset,
        }
