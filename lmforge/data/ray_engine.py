"""The ``ray`` engine for ``prepare``: each task is one Ray task running ``process_task``.

Why Ray tasks (not Ray Data): ``prepare``'s unit of work is already a task of ~1 MB of text whose
result must come back to the driver *in order* (global dedup, split, shard writing). A bounded window
of ``ray.remote`` calls collected with ``ray.get`` in submission order is exactly that, with Ray's own
scheduling, retries and object store, and it starts in well under a second on a running cluster; Ray
Data would add a streaming executor, block repartitioning and an ordering option on top of the same
tasks, for no gain here.

The tokenizer files travel through the object store once per run, so worker nodes need no copy of
the driver's tokenizer dir. Input files that the workers read themselves (small files, grouped into
tasks) must be reachable from every node: ``s3://``/``gs://`` URLs or a shared filesystem.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.config import UserError
from lmforge.data.engines import in_flight_limit

TOKENIZER_BLOB_LIMIT = 256 << 20  # a tokenizer dir bigger than this is not a tokenizer dir


def tokenizer_files(directory: str) -> dict[str, bytes]:
    """Every regular file directly in the tokenizer dir, by name (what ``load_tokenizer`` reads)."""
    out: dict[str, bytes] = {}
    total = 0
    for p in sorted(Path(directory).iterdir()):
        if p.is_file():
            total += p.stat().st_size
            if total > TOKENIZER_BLOB_LIMIT:
                raise UserError(f"tokenizer dir '{directory}' holds over {TOKENIZER_BLOB_LIMIT >> 20} MB of "
                                "files; point --tokenizer at the dir with tokenizer.json only")
            out[p.name] = p.read_bytes()
    return out


def _materialize_tokenizer(files: dict[str, bytes]) -> str:
    """On a node without the driver's tokenizer dir: write the shipped files once into a dir named by
    their hash (a rename makes concurrent workers on one node safe)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    root = Path(tempfile.gettempdir()) / "lmforge-ray-tokenizers"
    target = root / h.hexdigest()[:24]
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok", dir=root))
        for name, blob in files.items():
            (tmp / name).write_bytes(blob)
        try:
            os.replace(tmp, target)
        except OSError:  # another worker got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _run_task(fn: Callable[[Any, Any], Any], task: Any, cfg: Any, tok_files: dict[str, bytes]) -> Any:
    """Body of one Ray task: the same ``process_task`` the local engine runs."""
    import dataclasses

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if not os.path.isdir(cfg.tokenizer_dir):
        cfg = dataclasses.replace(cfg, tokenizer_dir=_materialize_tokenizer(tok_files))
    return fn(task, cfg)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) address must accept a TCP connection: Ray itself retries
    an unreachable one for minutes. ``auto`` and other forms are left to Ray."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in hostport:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise UserError(f"--ray-address={address}: nothing answers there ({e}); start the cluster with "
                        "`ray start --head`, check the address, or drop --ray-address for a local cluster") \
            from None



@contextlib.contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Restore this process's SIGTERM / SIGINT handlers after the block: ``ray.init`` replaces SIGTERM's
    with one that exits with status 15, which would bypass lmforge's (cleanup, then exit 143)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)

class RayEngine:
    """Ray tasks on a local cluster (started here, ``num_cpus=workers``) or on ``address``."""

    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("--engine ray needs Ray; pip install 'lmforge[ray]' (or use --engine local)") \
                from None
        self.ray = ray
        self.address = address
        self.started = False
        self.pending: collections.deque = collections.deque()
        if address:
            check_reachable(address)
        if not ray.is_initialized():
            try:
                with keep_signal_handlers():  # ray.init installs its own SIGTERM handler (sys.exit(15))
                    if address:
                        ray.init(address=address, log_to_driver=False)
                    else:
                        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            except ConnectionError as e:
                raise UserError(f"--ray-address={address}: no Ray cluster there ({e}); start one with "
                                "`ray start --head` or drop --ray-address for a local one") from None
            except (ValueError, RuntimeError) as e:
                raise UserError(f"--ray-address={address}: cannot connect ({e})") from None
            self.started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Explicit --workers caps the tasks running at once; the default (1) on a cluster means all its CPUs.
        self.workers = workers if workers > 1 or not address else max(cpus, 1)

    def map_ordered(self, fn: Callable[[Any, Any], Any], tasks: Iterable[Any], cfg: Any) -> Iterator[Any]:
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=2)(_run_task)
        fn_ref, cfg_ref = ray.put(fn), ray.put(cfg)
        tok_ref = ray.put(tokenizer_files(cfg.tokenizer_dir))
        for task in tasks:
            self.pending.append(remote.remote(fn_ref, task, cfg_ref, tok_ref))
            while len(self.pending) >= in_flight_limit(self.workers):
                yield self._get(self.pending.popleft())
        while self.pending:
            yield self._get(self.pending.popleft())

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, UserError):  # bad input found by a worker: the same one-line error as local
                raise UserError(str(cause)) from None
            raise

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": self.workers}

    def close(self, failed: bool = False) -> None:
        for ref in self.pending:
            with contextlib.suppress(self.ray.exceptions.RayError, ValueError):  # finished, or cluster gone
                self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            self.ray.shutdown()
            self.started = False
