"""Metrics: the metrics.jsonl writer (plus optional TensorBoard), the progress line, memory, and the
peak-FLOPs figure MFU is measured against (CPU: the best fp32 matmul rate this machine has shown, cached, and
raised whenever a training window computes faster, so MFU never exceeds 100%)."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import atomic_write_text
from lmforge.train.report import format_duration  # defined there: the report is torch-free

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name.
GPU_BF16_PEAK = {
    "H200": 989.5e12,
    "H100": 989.5e12,  # SXM; the PCIe card is lower (756 TF) — set log.peak_tflops for it
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE_DIR") or Path.home() / ".cache" / "lmforge")


def measure_matmul_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         n: int = 2048, seconds: float = 1.0) -> float:
    """Best sustained FLOP/s of an n×n×n matmul over ~``seconds`` (the practical peak MFU compares to)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG (exact resume)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device, precision: str = "fp32", configured_tflops: float | None = None) -> tuple[float, str]:
    """(FLOP/s per device, where the figure comes from). Measured figures are cached per machine (the best
    so far). Whatever the source, :class:`ThroughputMeter` raises the figure when training beats it."""
    if configured_tflops:
        return configured_tflops * 1e12, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if precision == "bf16":
            for key, value in GPU_BF16_PEAK.items():
                if key in name:
                    return value, f"{key} bf16 spec"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        key = f"cuda|{name}|{dtype}|{torch.__version__}"
        return _cached(key, lambda sec: measure_matmul_flops(device, dtype, n=8192, seconds=sec)), "measured matmul"
    key = f"cpu|{_cpu_name()}|threads={torch.get_num_threads()}|{torch.__version__}"
    return _cached(key, lambda sec: measure_matmul_flops("cpu", torch.float32, seconds=sec)), "measured fp32 matmul"


def _cached(key: str, measure) -> float:
    """The best figure measured on this machine so far. On a shared machine one measurement can come out
    low (other processes were busy), so every call measures briefly again and the cache keeps the maximum."""
    path = cache_dir() / "peak_flops.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    cached = float(table.get(key, 0.0))
    value = max(cached, measure(0.3 if cached else 1.0))
    if value > cached:
        table[key] = value
        try:
            atomic_write_text(path, json.dumps(table, indent=1))
        except OSError:
            pass  # a read-only home only costs a re-measurement next time
    return value


def memory_stats(device: torch.device, reset: bool = False) -> dict[str, float]:
    """Current and peak memory in GB.

    CUDA: ``mem_gb`` / ``peak_mem_gb`` what tensors hold (allocated), ``reserved_gb`` / ``peak_reserved_gb``
    what the caching allocator holds from the device (what runs out first: fragmentation lives here).
    CPU: the process's resident set (``mem_gb``) and its high-water mark (``peak_mem_gb``).
    ``reset``: start the peaks over after reading them, so each log row's peak is that of its own steps,
    not the largest since the start (on Linux the CPU high-water mark is reset through /proc/self/clear_refs).
    """
    if device.type == "cuda":
        out = {"mem_gb": torch.cuda.memory_allocated(device) / 1e9,
               "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9,
               "reserved_gb": torch.cuda.memory_reserved(device) / 1e9,
               "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return out
    rss = 0.0
    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        pass
    peak = _vm_hwm_gb()
    if peak is None:  # no /proc: the lifetime peak (cannot be reset)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KiB on Linux
    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        except OSError:
            pass
    return {"mem_gb": rss, "peak_mem_gb": max(peak, rss)}


def _vm_hwm_gb() -> float | None:
    """The process's peak resident set since start or the last reset (Linux), GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return None


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the row parseable
    if isinstance(value, torch.Tensor):
        return _clean(value.item())
    return value


class MetricsWriter:
    """Appends one JSON object per row to RUN/metrics.jsonl (rank 0 only), optionally to TensorBoard, and hands
    every row to ``trackers`` (``lmforge.train.trackers.Trackers``: MLflow, W&B)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False, trackers=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop rows the interrupted run wrote past it, so the file reads as one run."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a half-written last line from a kill
            if row.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(x + "\n" for x in keep))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{row.get('kind', 'train')}/{k}", v, step)
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class ThroughputMeter:
    """Per-step figures summed over a logging window: time, tokens processed, loss tokens, loss and grad
    norm of the finite steps. ``tok_per_s`` and MFU count the tokens that went through forward passes
    (every input position, padding excluded); the loss tokens (targets: all of them for pretraining, the
    assistant tokens for SFT, ~15% for MLM) are reported beside them.
    """

    # re-measurements of the peak one run may spend (each ~0.3 s) when its windows beat the figure it holds
    MAX_REMEASURES = 3

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None, n_devices: int = 1,
                 remeasure: Callable[[], float] | None = None):
        """``peak_flops``: per device; ``remeasure``: measures it again (``peak_flops()``), called when a
        window's achieved FLOP/s per device beat the figure held, which then becomes the larger of the new
        measurement and the achieved rate: MFU is at most 1 by construction."""
        self.flops_per_token, self.peak, self.n_devices = flops_per_token, peak_flops, n_devices
        self.remeasure, self.remeasures = remeasure, 0
        self.raised = False  # True once the peak was raised above the figure the run started with
        self.history: list[float] = []  # tok/s of each closed window (the run's figure is their median)
        self.ema_dt: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.steps = self.skipped = self.finite = 0
        self.time = self.loss = self.grad_norm = 0.0
        self.tokens = self.loss_tokens = 0

    def add(self, dt: float, out: dict[str, Any]) -> None:
        """One optimizer step: ``out`` holds loss, grad_norm, finite, tokens (processed), loss_tokens."""
        self.steps += 1
        self.time += dt
        self.tokens += int(out["tokens"])
        self.loss_tokens += int(out["loss_tokens"])
        if out["finite"]:
            self.finite += 1
            self.loss += out["loss"]
            self.grad_norm += out["grad_norm"]
        else:
            self.skipped += 1
        self.ema_dt = dt if self.ema_dt is None else 0.9 * self.ema_dt + 0.1 * dt

    def mfu(self, tok_per_s: float | None) -> float | None:
        """Achieved FLOP/s over the peak, at most 1: a rate above the peak held means the peak was measured
        low (a busy machine) or configured low, so it is re-measured and raised to at least that rate."""
        if not tok_per_s or not self.flops_per_token or not self.peak:
            return None
        achieved = tok_per_s * self.flops_per_token / self.n_devices  # per device
        if achieved > self.peak:
            self._raise_peak(achieved)
        return achieved / self.peak

    def _raise_peak(self, achieved: float) -> None:
        measured = 0.0
        if self.remeasure is not None and self.remeasures < self.MAX_REMEASURES:
            self.remeasures += 1
            measured = self.remeasure()
        self.peak = max(self.peak, measured, achieved)
        self.raised = True

    def close_window(self, last: dict[str, Any]) -> dict[str, Any]:
        """The window's metrics (``last`` = the last step's output, used when every step was skipped)."""
        tok_per_s = self.tokens / self.time if self.time else 0.0
        row = {"loss": self.loss / self.finite if self.finite else last["loss"],
               "grad_norm": self.grad_norm / self.finite if self.finite else last["grad_norm"],
               "tok_per_s": tok_per_s,
               "loss_tok_per_s": self.loss_tokens / self.time if self.time else 0.0,
               "mfu": self.mfu(tok_per_s),
               "peak_tflops": self.peak / 1e12 if self.peak else None,  # the per-device peak MFU is against
               "step_time": self.time / max(1, self.steps),
               "skipped": self.skipped}
        if self.steps:
            self.history.append(tok_per_s)
        self._reset()
        return row

    def median_tok_per_s(self) -> float | None:
        return sorted(self.history)[len(self.history) // 2] if self.history else None


class Progress:
    """One status line on stderr: step, loss, lr, tokens/s, ETA. Redrawn in place on a terminal."""

    def __init__(self, total_steps: int, enabled: bool = True, every: int = 1):
        self.total = total_steps
        self.every = max(1, every)  # without a terminal, print one line every this many steps
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_len = 0

    def update(self, step: int, loss: float, lr: float, tok_per_s: float, seconds_per_step: float,
               extra: str = "") -> None:
        if not self.enabled or (not self.tty and step % self.every and step != self.total):
            return
        eta = (self.total - step) * seconds_per_step
        width = 20
        done = int(width * step / max(1, self.total))
        bar = "#" * done + "." * (width - done)
        line = (f"[{bar}] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{tok_per_s:,.0f} tok/s ETA {format_duration(eta)}{extra}")
        if self.tty:
            pad = max(0, self._last_len - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            sys.stderr.flush()
            self._last_len = len(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.tty and self._last_len:
            sys.stderr.write("\n")
            self._last_len = 0
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self._last_len:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._last_len = 0
