"""Run dirs under the dashboard's roots: finding them, naming them safely, and what each one holds.

A run dir is a directory with a ``metrics.jsonl``, or with a ``config.yaml`` beside ``checkpoints/`` (a run
that has not logged yet), or with the run lock ``.lmforge.lock`` (:mod:`lmforge.lock`). Roots are walked a
few levels deep without following symlinks and without descending into a run's own ``checkpoints/``,
``model/``, ``tensorboard/`` or hidden dirs.

A run is named by ``ROOT_INDEX/RELATIVE/PATH`` (``0/pretrain/tiny``). :meth:`Roots.resolve` refuses a name
with ``..``, an absolute part, or one whose real path (symlinks resolved) leaves its root — a symlink inside a
root that points out of it is never followed.

Status, from the lock file and the last ``end`` event of ``metrics.jsonl``:

* ``running`` — the lock names a live process (pid on this host); with its pid, host and command;
* ``finished`` — the last segment ended with ``max_steps``, ``data_exhausted`` or ``early_stop``;
* ``stopped`` — it ended on a signal or the time limit (the reason is shown; running the command again resumes);
* ``failed`` — it ended with ``diverged`` / ``spike``, or its process died holding the lock, or it has no end
  event after its last start (killed or crashed); the reason is one line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from lmforge.config import safe_load_yaml_text
from lmforge.dashboard.metrics import MetricsReader
from lmforge.lock import LOCK_NAME
from lmforge.train.checkpoint import verify_checkpoint

MAX_DEPTH = 4
SKIP_DIRS = {"checkpoints", "model", "tensorboard", "adapter", "best", "__pycache__", "node_modules"}
FINISHED = {"max_steps", "data_exhausted", "early_stop"}
STOPPED = {"signal": "stopped by a signal (SIGTERM / SIGINT / SIGUSR1); run the same command again to resume",
           "time_limit": "stopped at its time limit (train.time_limit); run the same command again to resume"}
FAILED = {"diverged": "the loss diverged (not finite)", "spike": "stopped on a loss spike (train.spike)"}
_STEP_RE = re.compile(r"^step_(\d+)$")
MAX_SMALL_FILE = 4 << 20  # config.yaml, report.md, eval results, the lock file
DISK_CACHE_S = 10.0


class Refused(Exception):
    """A run name that is malformed (404) or leaves its root (403)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_run_dir(p: Path) -> bool:
    return ((p / "metrics.jsonl").is_file() or (p / LOCK_NAME).is_file()
            or ((p / "config.yaml").is_file() and (p / "checkpoints").is_dir()))


class Roots:
    def __init__(self, roots: list[str | os.PathLike]):
        self.roots = [Path(os.path.abspath(os.path.expanduser(str(r)))) for r in roots]
        self.real = [r.resolve() for r in self.roots]
        self._disk: dict[str, tuple[float, int]] = {}

    # ---- names ---------------------------------------------------------------------------------------------
    def discover(self) -> list[tuple[str, Path]]:
        """(name, path) of every run dir under the roots, sorted by name."""
        found = []
        for i, root in enumerate(self.roots):
            if not root.is_dir():
                continue
            stack = [(root, 0)]
            while stack:
                d, depth = stack.pop()
                if is_run_dir(d):
                    rel = d.relative_to(root).as_posix()
                    found.append((f"{i}" if rel == "." else f"{i}/{rel}", d))
                if depth >= MAX_DEPTH:
                    continue
                try:
                    entries = list(os.scandir(d))
                except OSError:
                    continue
                for e in entries:
                    if e.name.startswith(".") or e.name in SKIP_DIRS:
                        continue
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append((Path(e.path), depth + 1))
                    except OSError:
                        continue
        return sorted(found)

    def resolve(self, name: str) -> Path:
        """The run dir named ``name``; :class:`Refused` (404 / 403) for anything else."""
        if not isinstance(name, str) or not name or len(name) > 4096 or "\x00" in name:
            raise Refused(404, "no such run")
        head, _, rel = name.partition("/")
        if not head.isdigit() or int(head) >= len(self.roots):
            raise Refused(404, f"no such run '{name[:200]}': it names no root (0..{len(self.roots) - 1})")
        i = int(head)
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        if any(p == ".." or "\\" in p for p in parts) or rel.startswith("/"):
            raise Refused(403, f"'{name[:200]}' leaves the runs roots; name a run as the runs list does")
        path = self.roots[i].joinpath(*parts)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise Refused(404, f"no such run '{name[:200]}'") from None
        if real != self.real[i] and self.real[i] not in real.parents:
            raise Refused(403, f"'{name[:200]}' leads out of the runs roots (a symlink); it is not shown")
        if not real.is_dir() or not is_run_dir(real):
            raise Refused(404, f"'{name[:200]}' is not a run dir (no metrics.jsonl, lock or checkpoints)")
        return real

    # ---- disk ----------------------------------------------------------------------------------------------
    def disk_used(self, path: Path) -> int:
        key = str(path)
        hit = self._disk.get(key)
        if hit and time.monotonic() - hit[0] < DISK_CACHE_S:
            return hit[1]
        total, stack = 0, [path]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        try:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(Path(e.path))
                            elif e.is_file(follow_symlinks=False):
                                total += e.stat(follow_symlinks=False).st_blocks * 512
                        except OSError:
                            continue
            except OSError:
                continue
        self._disk[key] = (time.monotonic(), total)
        return total


def read_small(path: Path, limit: int = MAX_SMALL_FILE) -> str | None:
    """The text of a small regular file inside a run (not a symlink), or None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def read_config(run: Path) -> dict[str, Any]:
    text = read_small(run / "config.yaml")
    if text is None:
        return {}
    try:
        data = safe_load_yaml_text(text)
    except Exception:  # noqa: BLE001 - a broken config.yaml shows as no config, never as a crash
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (ValueError, TypeError, OverflowError, OSError):
        return False
    return True


def read_lock(run: Path) -> dict[str, Any] | None:
    text = read_small(run / LOCK_NAME, 65536)
    if text is None:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def status(run: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """{"state": running|finished|stopped|failed|new, "reason": one line, "pid", "host", "command"}."""
    holder = read_lock(run)
    if holder is not None:
        host = holder.get("host")
        here = host in (None, socket.gethostname())
        if here and _pid_alive(holder.get("pid")):
            return {"state": "running", "pid": holder.get("pid"), "host": host, "command": holder.get("command"),
                    "reason": f"pid {holder.get('pid')} ({holder.get('command', '?')})"}
        if not here:
            return {"state": "running", "pid": holder.get("pid"), "host": host, "command": holder.get("command"),
                    "reason": f"pid {holder.get('pid')} on {host} (another host: not checked)"}
        if summary.get("end") is None:
            return {"state": "failed", "pid": holder.get("pid"),
                    "reason": f"its process (pid {holder.get('pid')}) died without ending the run (killed or "
                              "crashed); run the same command again to resume"}
    end = summary.get("end")
    if end is None:
        if summary.get("segments", 0) == 0:
            return {"state": "new", "reason": "no training rows yet"}
        return {"state": "failed", "reason": "no end event after its last start: the process was killed or crashed; "
                                             "run the same command again to resume"}
    reason = str(end.get("reason", "?"))
    if reason in FINISHED:
        return {"state": "finished", "reason": reason}
    if reason in FAILED:
        return {"state": "failed", "reason": f"{reason}: {FAILED[reason]}"}
    return {"state": "stopped", "reason": f"{reason}: {STOPPED.get(reason, 'stopped before its last step')}"}


def model_name(cfg: dict[str, Any]) -> str | None:
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    init = cfg.get("init") if isinstance(cfg.get("init"), dict) else {}
    for v in (model.get("preset"), init.get("model") if init else None, model.get("name")):
        if isinstance(v, str) and v:
            desc = v
            break
    else:
        desc = None
    dims = [f"{k}={model[k]}" for k in ("dim", "n_layers") if isinstance(model.get(k), int)]
    return " ".join([desc or "custom", *dims]) if (desc or dims) else None


def data_name(cfg: dict[str, Any]) -> str | None:
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    for k in ("dir", "path", "train", "sources"):
        v = data.get(k)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, list) and v:
            return f"{len(v)} sources"
    return None


def checkpoints(run: Path) -> list[dict[str, Any]]:
    """RUN/checkpoints/step_*: step, bytes, verified (presence and sizes against MANIFEST.json), LATEST."""
    ckpt = run / "checkpoints"
    latest = (read_small(ckpt / "LATEST", 4096) or "").strip()
    out = []
    try:
        entries = list(os.scandir(ckpt))
    except OSError:
        return out
    for e in entries:
        m = _STEP_RE.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        p = Path(e.path)
        size = 0
        for f in p.iterdir():
            try:
                if f.is_file() and not f.is_symlink():
                    size += f.stat().st_size
            except OSError:
                continue
        why = verify_checkpoint(p, deep=False)
        out.append({"name": e.name, "step": int(m.group(1)), "bytes": size, "verified": why is None,
                    "problem": why, "latest": e.name == Path(latest).name if latest else False})
    return sorted(out, key=lambda c: c["step"])


def eval_results(run: Path) -> list[dict[str, Any]]:
    """``lmforge eval`` result files in RUN/model/eval/ and RUN/eval/ (JSON, bounded)."""
    out = []
    for d in (run / "model" / "eval", run / "eval"):
        if d.is_symlink() or not d.is_dir():
            continue
        for f in sorted(d.glob("*.json"))[:200]:
            text = read_small(f, 1 << 20)
            if text is None:
                continue
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                continue
            out.append({"file": f.relative_to(run).as_posix(), "result": data})
    return out


SAMPLES_DIRS = ("completions",)  # GRPO: RUN/completions/step_NNNNNN.jsonl (prompts, completions, rewards)
_SAMPLES_RE = re.compile(r"^step_(\d+)\.jsonl$")
MAX_SAMPLE_FILES = 500  # the newest, in the run view's list
MAX_SAMPLE_BYTES = 2 << 20  # read from the start of one samples file
MAX_SAMPLE_ROWS = 200
MAX_SAMPLE_TEXT = 4000  # characters of one prompt / completion shown


def sample_files(run: Path) -> list[dict[str, Any]]:
    """Sample generations a run logged: ``[{"name": "completions/step_000012.jsonl", "step", "bytes"}]`` by step
    (regular files only, the newest ``MAX_SAMPLE_FILES``)."""
    out = []
    for sub in SAMPLES_DIRS:
        d = run / sub
        if d.is_symlink() or not d.is_dir():
            continue
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            m = _SAMPLES_RE.match(e.name)
            if not m or not e.is_file(follow_symlinks=False):
                continue
            try:
                size = e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            out.append({"name": f"{sub}/{e.name}", "step": int(m.group(1)), "bytes": size})
    return sorted(out, key=lambda f: (f["step"], f["name"]))[-MAX_SAMPLE_FILES:]


def _clip(v: Any) -> Any:
    if isinstance(v, str) and len(v) > MAX_SAMPLE_TEXT:
        return v[:MAX_SAMPLE_TEXT] + f"… ({len(v) - MAX_SAMPLE_TEXT} more characters)"
    if isinstance(v, dict):
        return {str(k)[:200]: _clip(x) for k, x in list(v.items())[:50]}
    if isinstance(v, list):
        return [_clip(x) for x in v[:50]]
    return v


def read_samples(run: Path, name: str) -> dict[str, Any]:
    """The rows of one file :func:`sample_files` lists (any other name is refused: nothing outside the run's
    samples dirs is read), at most ``MAX_SAMPLE_ROWS`` rows from its first ``MAX_SAMPLE_BYTES``; unreadable lines
    are counted, long texts clipped."""
    listed = {f["name"] for f in sample_files(run)}
    if name not in listed:
        raise Refused(404, f"'{name[:200]}' is not a samples file of this run; pick one /api/samples lists")
    try:
        with open(run / name, "rb") as f:
            data = f.read(MAX_SAMPLE_BYTES + 1)
    except OSError as e:
        raise Refused(404, f"{name} cannot be read ({e.strerror})") from None
    truncated = len(data) > MAX_SAMPLE_BYTES
    lines = data[:MAX_SAMPLE_BYTES].split(b"\n")
    if truncated:
        lines = lines[:-1]  # the last line is cut
    rows, bad = [], 0
    for raw in lines:
        if not raw.strip():
            continue
        if len(rows) >= MAX_SAMPLE_ROWS:
            truncated = True
            break
        try:
            row = json.loads(raw)
        except (ValueError, RecursionError):
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(_clip(row))
        else:
            bad += 1
    return {"name": name, "rows": rows, "bad_lines": bad, "truncated": truncated}


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def config_diff(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The dotted keys whose values are not the same in every config (a key missing in one counts as a
    difference): [{"key", "values": {run: value or None}, "missing": [runs]}]."""
    flat = {name: flatten(cfg) for name, cfg in configs.items()}
    keys = sorted(set().union(*[set(f) for f in flat.values()])) if flat else []
    out = []
    for k in keys:
        vals = {n: f.get(k) for n, f in flat.items()}
        present = [n for n, f in flat.items() if k in f]
        distinct = {json.dumps(v, sort_keys=True, default=str) for n, v in vals.items() if n in present}
        if len(distinct) > 1 or len(present) < len(flat):
            out.append({"key": k, "values": vals, "missing": [n for n in flat if n not in present]})
    return out


class RunCache:
    """One :class:`MetricsReader` per run (summary and downsampled series), advanced by at most ``budget_s``
    of reading per request so a huge file never blocks an answer; a rewritten file starts over."""

    def __init__(self, budget_s: float = 1.0, max_points: int | None = None):
        self.budget_s = budget_s
        self.max_points = max_points
        self.readers: dict[Path, MetricsReader] = {}

    def reader(self, run: Path, budget_s: float | None = None) -> MetricsReader:
        r = self.readers.get(run)
        if r is None:
            r = MetricsReader(run / "metrics.jsonl")
            if self.max_points:
                r.max_points = self.max_points
            self.readers[run] = r
        if r.replaced():
            r.restart()
        deadline = time.monotonic() + (self.budget_s if budget_s is None else budget_s)
        while True:
            before = r.cursor.offset
            r.read()
            if r.cursor.offset == before or time.monotonic() > deadline:
                break
        return r


def describe(roots: Roots, cache: RunCache, name: str, run: Path, budget_s: float | None = None) -> dict[str, Any]:
    """The runs list's row for one run."""
    r = cache.reader(run, budget_s)
    summary = r.summary()
    size = r.size()
    cfg = read_config(run)
    st = status(run, summary)
    if st["state"] == "running":
        step_time = summary["last_train"].get("step_time")
        st["steps_per_s"] = round(1.0 / step_time, 4) if step_time else None
    run_cfg = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
    return {"id": name, "path": str(run), "title": run_cfg.get("name") or run.name, "status": st,
            "model": model_name(cfg), "data": data_name(cfg), "task": cfg.get("task"),
            "disk_bytes": roots.disk_used(run), "metrics_bytes": size,
            "indexed": size is None or r.cursor.offset >= size, **summary}
