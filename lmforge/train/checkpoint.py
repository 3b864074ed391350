"""Checkpoints: torch.distributed.checkpoint (DCP) shards + JSON metadata, written so a kill at any
moment leaves ``LATEST`` pointing at a complete, loadable checkpoint.

Layout of one checkpoint (``RUN/checkpoints/step_000500/``)::

    __0_0.distcp ...   DCP shards: model parameters and optimizer state (tensors only)
    .metadata          DCP's own index
    rank_00000.json    per-rank state: data-loader position, RNG states (base64), ...
    meta.json          step, tokens, config + its hash, trainer state
    MANIFEST.json      size and sha256 of every other file; written last

Save order: everything goes into ``.tmp_step_000500/``; meta.json and then MANIFEST.json are written
last inside it; the directory is renamed into place; only then is ``LATEST`` replaced (temp file +
atomic rename). Old checkpoints are pruned after that, keeping the newest ``keep_last`` and every
``keep_every``-th step, and never the one LATEST names nor one being written.

Hashing: every rank's shards, DCP's index and the JSON files are hashed as they are written
(`HashingWriter`; nothing is read back), the ranks' digests are pooled, rank 0 writes the manifest.

Asynchronous saves (``checkpoint.async``): the state is copied to host memory in the caller (DCP's
``async_save`` staging), DCP writes the copy in a background thread over a gloo group of its own, and a
second background thread then pools the digests and publishes (meta.json, MANIFEST.json, rename, LATEST,
prune) exactly as above, so a crash at any moment still leaves LATEST on a complete checkpoint. At most one
save is in flight; the next one waits for it (`CheckpointManager.wait`).

Trust model. A checkpoint is data, never code:

* DCP's ``.metadata`` index is a pickle. It is read by :class:`SafeReader` through a restricted
  unpickler that admits only DCP's own metadata classes and the few torch/pathlib types they hold
  (``torch.Size``, dtypes, layouts, ``PosixPath``); any other global (``os.system``, ``builtins.eval``,
  ...) stops the load before anything runs.
* The index is then checked: every entry must be a tensor (lmforge saves only tensors), so DCP never
  reaches the byte-entry path that ``torch.load(weights_only=False)``-s a slice of a ``.distcp`` file;
  every storage entry must name a ``__R_N.distcp`` file inside the checkpoint with no transforms.
  Tensor slices are read by DCP with ``weights_only=True``; :class:`SafeLoadPlanner` refuses byte
  entries as a second line of defence.
* MANIFEST.json (size + sha256 of every file, taken while writing it) detects truncation and
  corruption, not tampering: whoever can rewrite the files can rewrite the manifest. Resuming picks
  the newest checkpoint whose manifest verifies and names each one it skipped and why.

Frozen parameters (a LoRA run's base weights, a frozen backbone) are not saved: they come from the model
dir the run started from, so a LoRA checkpoint holds only the adapters (and head) and their optimizer state.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import io
import json
import os
import random
import re
import shutil
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmforge.config import UserError, atomic_write_text, read_json_bounded
from lmforge.console import info
from lmforge.distributed.world import side_group
from lmforge.train.dcp_safe import DCP_INDEX, SafeLoadPlanner, SafeReader, read_dcp_index

LATEST = "LATEST"
META = "meta.json"
MANIFEST = "MANIFEST.json"
_HASH_CHUNK = 1 << 20
_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- RNG state as JSON -------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": _b64(torch.get_rng_state()),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(_unb64(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def to_jsonable(obj: Any) -> Any:
    """Loader / trainer state -> JSON: numpy scalars and arrays, tensors and tuples become plain values."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


# ---- trust: the manifest ---------------------------------------------------------------------
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256 computed by the ranks together (`_prehash`)


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _digest(path: Path) -> str:
    """sha256 of a file: the ranks' shared result when `_prehash` computed it, else read here."""
    try:
        known = _DIGESTS.get(_file_key(path))
    except OSError:
        known = None
    return known if known is not None else _sha256(path)


def _sha256(path: Path) -> str:
    """sha256 of a file, streamed in 1 MiB chunks (a 7B checkpoint never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, hashed: dict[str, dict[str, Any]] | None = None) -> None:
    """MANIFEST.json: size and sha256 of every file in checkpoint ``path``; call it last. ``hashed``:
    entries already computed (by `hash_shares` on every rank); the files not in it are hashed here."""
    path = Path(path)
    hashed = hashed or {}
    files = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            entry = hashed.get(f.name)
            if entry is None or entry["size"] != f.stat().st_size:
                entry = {"size": f.stat().st_size, "sha256": _sha256(f)}
            files[f.name] = entry
    atomic_write_text(path / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))


# The slowest rate a share is assumed to hash at (a network filesystem under load); the wait for the other
# ranks' hashes is bounded by what this rate needs for the largest share, plus a margin — not by the
# process group's timeout, which a 7B checkpoint hashed on one rank used to exceed.
MIN_HASH_BYTES_PER_S = 50e6
HASH_WAIT_MARGIN_S = 120.0
_EXCHANGES = 0


def split_shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """Files dealt to ``n`` ranks, largest first to the least loaded (deterministic: every rank computes
    the same split from the same listing)."""
    shares: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(n), key=lambda r: (load[r], r))
        shares[i].append(name)
        load[i] += sizes[name]
    return shares


def hash_wait_s(sizes: dict[str, int], n: int) -> float:
    """Seconds to wait for every rank's share: the largest share at MIN_HASH_BYTES_PER_S, plus a margin."""
    shares = split_shares(sizes, n)
    biggest = max((sum(sizes[f] for f in share) for share in shares), default=0)
    return biggest / MIN_HASH_BYTES_PER_S + HASH_WAIT_MARGIN_S


def hash_shares(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} for ``names`` in ``path``, the hashing split over the ranks (each reads only
    its share, all at once) and the entries handed to every rank through the job's key-value store, with a
    wait sized from the work (`hash_wait_s`). One process: hashes everything here."""
    global _EXCHANGES
    sizes = {n: (path / n).stat().st_size for n in names}
    if not (_dist() and dist.get_world_size() > 1):
        return {n: {"size": sizes[n], "sha256": _sha256(path / n)} for n in names}
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = {}
    for n in split_shares(sizes, world)[rank]:
        try:
            mine[n] = {"size": sizes[n], "sha256": _sha256(path / n)}
        except OSError as e:  # every rank must post its share; a missing digest is re-read (and fails) later
            mine[n] = {"size": sizes[n], "sha256": None, "error": str(e)}
    _EXCHANGES += 1
    prefix = f"lmforge/ckpt_hash/{path.name}/{_EXCHANGES}"
    store = _default_store()
    if store is None:  # no store to wait on with our own timeout: the process group's collective
        got: list[Any] = [None] * world
        dist.all_gather_object(got, mine)
    else:
        store.set(f"{prefix}/{rank}", json.dumps(mine))
        keys = [f"{prefix}/{r}" for r in range(world)]
        store.wait(keys, datetime.timedelta(seconds=hash_wait_s(sizes, world)))
        got = [json.loads(store.get(k)) for k in keys]
    out: dict[str, dict[str, Any]] = {}
    for part in got:
        out.update(part)
    return out


def _default_store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        return None


_VERIFIED: dict[tuple, str | None] = {}  # (path, stats of its files, deep) -> reason or None
_NOTED: set[tuple[str, str]] = set()


def _stat_key(path: Path) -> tuple:
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir()
                            if f.is_file() and (st := f.stat())))
    except OSError:
        return ()


def _read_manifest(path: Path) -> dict[str, Any] | str:
    mf = path / MANIFEST
    if not mf.is_file():
        return f"{MANIFEST} is missing (the save did not finish)"
    if mf.stat().st_size > 64 << 20:
        return f"{MANIFEST} is larger than 64 MB"
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
        files = data["files"]
        well_formed = all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                          for e in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        well_formed = False
    return files if well_formed else f"{MANIFEST} is truncated or not a manifest"


def verify_checkpoint(path: str | os.PathLike, deep: bool = True) -> str | None:
    """None when checkpoint ``path`` is whole, else why not (one phrase). ``deep`` hashes every file;
    without it only presence and sizes are checked (cheap enough to call on every save)."""
    path = Path(path)
    key = (str(path.resolve()), _stat_key(path), deep)
    if key in _VERIFIED:
        return _VERIFIED[key]
    reason = _verify(path, deep)
    _VERIFIED[key] = reason
    return reason


def _verify(path: Path, deep: bool) -> str | None:
    if not path.is_dir():
        return "not a directory"
    files = _read_manifest(path)
    if isinstance(files, str):
        return files
    for required in (META, DCP_INDEX):
        if required not in files:
            return f"{MANIFEST} does not list {required}"
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in (".", ".."):
            return f"{MANIFEST} names '{name}', which is not a file of this checkpoint"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != entry["size"]:
            return f"{name} is {size} bytes but was saved with {entry['size']} (truncated or overwritten)"
        if deep and _digest(f) != entry["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{META} is unreadable"
    if not isinstance(meta, dict) or not meta.get("complete"):
        return f"{META} does not mark the save complete"
    if deep:  # the index is read (restricted, never executed) before anyone picks this checkpoint
        try:
            read_dcp_index(path / DCP_INDEX)
        except UserError as e:
            return str(e)
    return None


def _note_skip(path: Path, reason: str) -> None:
    if (str(path), reason) in _NOTED or (_dist() and dist.get_rank() != 0):
        return
    _NOTED.add((str(path), reason))
    info(f"note: skipping checkpoint {path}: {reason}")


# ---- finding checkpoints ----------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    """A checkpoint is complete when its manifest (written last) lists files that are all there at their
    saved sizes and meta.json says so. Cheap: no hashing (see :func:`verify_checkpoint`)."""
    return verify_checkpoint(path, deep=False) is None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    return [(step, p) for step, p in _step_dirs(ckpt_dir) if is_complete(p)]


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """LATEST's checkpoint first, then every step dir newest first."""
    named = []
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_RE.match(name) and (ckpt_dir / name).is_dir():
            named.append(ckpt_dir / name)
    return named + [p for _, p in reversed(_step_dirs(ckpt_dir)) if p not in named]


def _decided_on_rank0(decide: Any) -> Any:
    """Run ``decide()`` on rank 0 only and hand its result (or its UserError) to every rank: the files are
    hashed once, not once per rank, and all ranks resume from the same checkpoint. All ranks must call."""
    if not (_dist() and dist.get_world_size() > 1):
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # noqa: BLE001 - every rank must leave the broadcast; re-raised below
            box[0] = ("error", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)  # our own (str, Path) tuple, between our own processes
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def latest_checkpoint(ckpt_dir: Path, verify: bool = True) -> Path | None:
    """The newest checkpoint that verifies (LATEST's if it does), or None. Each one skipped is named with
    the reason on stderr. ``verify=False`` checks sizes only (no hashing, any rank may call it alone);
    with ``verify`` every rank of a distributed run must call it (rank 0 hashes, all get its answer)."""
    if verify:
        _prehash([Path(ckpt_dir)])
        return _decided_on_rank0(lambda: _latest(Path(ckpt_dir), True))
    return _latest(Path(ckpt_dir), False)


def _prehash(dirs: list[Path]) -> None:
    """Before rank 0 decides which checkpoint to trust: every rank hashes its share of the checkpoint it
    will most likely pick (the first candidate whose sizes check out), all at once, and rank 0's check then
    reads their digests instead of hashing ~100 GB alone while the others wait. Each rank reaches the same
    choice from the same files; an older candidate (the newest did not verify) is hashed by rank 0 alone."""
    if not (_dist() and dist.get_world_size() > 1):
        return
    target = None
    for d in dirs:
        if (d / META).is_file() or (d / MANIFEST).is_file() or (d / DCP_INDEX).is_file():
            target = d
            break
        target = next((c for c in _candidates(d) if verify_checkpoint(c, deep=False) is None), None)
        if target is not None:
            break
    files = _read_manifest(target) if target is not None else "none"
    if isinstance(files, str):
        return
    names = sorted(n for n in files if "/" not in n and "\\" not in n and (target / n).is_file()
                   and _file_key(target / n) not in _DIGESTS)  # the same on every rank: filled by the exchange
    if not names:
        return
    for name, entry in hash_shares(target, names).items():
        if entry.get("sha256"):
            try:
                _DIGESTS[_file_key(target / name)] = entry["sha256"]
            except OSError:
                pass


def _latest(ckpt_dir: Path, verify: bool) -> Path | None:
    for p in _candidates(ckpt_dir):
        reason = verify_checkpoint(p, deep=verify)
        if reason is None:
            return p
        _note_skip(p, reason)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a checkpoints/ dir (its LATEST) or a run dir (its checkpoints/LATEST). In a
    distributed run every rank must call it (rank 0 verifies)."""
    _prehash([Path(path), Path(path) / "checkpoints"])
    return _decided_on_rank0(lambda: _resolve(path))


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / META).is_file() or (p / MANIFEST).is_file() or (p / DCP_INDEX).is_file():
        reason = verify_checkpoint(p)
        if reason is not None:
            raise UserError(f"checkpoint '{path}' cannot be trusted: {reason}; pass an earlier step_NNNNNN dir, "
                            "or the run dir to pick the newest checkpoint that verifies")
        return p
    for candidate in (p, p / "checkpoints"):
        found = _latest(candidate, True)
        if found is not None:
            return found
    raise UserError(f"'{path}' holds no complete checkpoint (need meta.json + DCP shards + {MANIFEST}); "
                    "pass a step_NNNNNN dir, a checkpoints/ dir or a run dir")


def read_meta(path: Path) -> dict[str, Any]:
    meta = read_json_bounded(Path(path) / META, what="checkpoint meta")
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint '{path}': {META} is not a JSON object; resume from another checkpoint")
    return meta


def _reason(e: BaseException) -> str:
    """The one informative line of DCP's multi-rank traceback report (e.g. 'ValueError: Size mismatch ...')."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception):", ln)]
    return (errors[-1] if errors else (lines[0] if lines else type(e).__name__))[:300]


# ---- save / load ------------------------------------------------------------------------------
def state_dict_options(model: torch.nn.Module) -> StateDictOptions | None:
    """Checkpoint only trainable parameters when some are frozen (they are reloaded from the base model)."""
    if any(not p.requires_grad for p in model.parameters()):
        return StateDictOptions(ignore_frozen_params=True, strict=False)
    return None


_WRAPPER_PARTS = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def drop_frozen(model: torch.nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Remove frozen parameters from a model state dict, aliases included (a tied output head shares the
    frozen embedding but DCP's ``ignore_frozen_params`` only sees the first name of a shared parameter)."""
    frozen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            for part in _WRAPPER_PARTS:
                name = name.replace(part, "")
            frozen.add(name)
    return {k: v for k, v in state.items() if k not in frozen} if frozen else state


# ---- hashing while writing ------------------------------------------------------------------
class _HashingStream:
    """A file opened for writing that feeds every byte written through sha256 (DCP writes each shard front
    to back, never seeking back), so the manifest needs no second read of the file."""

    def __init__(self, f: Any):
        self._f = f
        self._h = hashlib.sha256()
        self.size = 0

    def write(self, b: Any) -> int:
        n = self._f.write(b)
        view = memoryview(b).cast("B")
        n = len(view) if n is None else n
        self._h.update(view[:n])
        self.size += n
        return n

    def seek(self, *args: Any) -> int:  # a rewrite behind the hash would make the digest wrong: refuse it
        raise io.UnsupportedOperation("a hashed checkpoint stream is written front to back")

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ...
        return getattr(self._f, name)


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording {file name: {size, sha256}} of each file it writes (all threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with open(path, mode) as f:
            stream = _HashingStream(f)
            yield stream
        with self._lock:
            self.digests[Path(path).name] = {"size": stream.size, "sha256": stream.hexdigest()}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP's .metadata.tmp -> .metadata
        with self._lock:
            if Path(path).name in self.digests:
                self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """DCP's file writer that hashes every shard and the index as it writes them (`digests`)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path)

    @property
    def digests(self) -> dict[str, dict[str, Any]]:
        return dict(self.fs.digests)


def _text_digest(text: str) -> dict[str, Any]:
    data = text.encode("utf-8")
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _all_gather(local: Any, group: Any = None) -> list[Any]:
    """Every rank's ``local`` (our own small dicts, between our own processes), in rank order."""
    if not (_dist() and dist.get_world_size(group) > 1):
        return [local]
    got: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, local, group=group)
    return got


def _gather_digests(local: dict[str, dict[str, Any]], group: Any = None) -> dict[str, dict[str, Any]]:
    """Every rank's {file: {size, sha256}} merged."""
    out: dict[str, dict[str, Any]] = {}
    for part in _all_gather(local, group):
        out.update(part)
    return out


def keep_set(steps: list[int], keep_last: int, keep_every: int = 0) -> set[int]:
    """The steps retention keeps: the newest ``keep_last`` plus every multiple of ``keep_every`` (> 0)."""
    kept = set(sorted(steps)[-keep_last:]) if keep_last > 0 else set()
    if keep_every > 0:
        kept |= {s for s in steps if s % keep_every == 0}
    return kept


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint dir: renamed to ``.trash_NAME`` first (one atomic step), then removed, so a kill
    mid-delete leaves no half-deleted ``step_N`` (the next start's `clean_partial` removes the trash)."""
    trash = path.parent / f".trash_{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


class CheckpointError(UserError):
    """A checkpoint save failed (raised where the run waits for it; LATEST still names the previous one)."""


_SINGLE_PROCESS_WARNING = ".*assuming the intent is to save in a single process.*"


class CheckpointManager:
    """Saves and loads training state under ``ckpt_dir`` (all ranks call save/load together).

    ``async_save``: `save` stages a host copy of the state (DCP's ``async_save``), writes it in a background
    thread while training goes on, and a second thread of this manager then writes meta.json and the
    manifest and moves LATEST; a crash at any moment leaves LATEST on a complete checkpoint. At most one save
    is in flight: the next `save` (and `wait`) waits for it, and `last_wait_s` says how long. Every save
    hashes the files as it writes them (`HashingWriter`), so nothing is read back for the manifest.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 3, rank: int = 0, *, keep_every: int = 0,
                 async_save: bool = False):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.rank = rank
        self.async_save = async_save
        self.last_wait_s = 0.0  # how long the last `save` waited for the one before it
        self.last_stall_s = 0.0  # how long the last `save` held the caller (its whole time when synchronous)
        self.last_write_s: float | None = None  # the last finished background save, call to LATEST
        self._pending: Future | None = None
        self._pending_name: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        self._staging: Any = None  # DCP's DefaultStager: the host copy of async saves, reused

    def clean_partial(self) -> None:
        """Remove temp dirs a killed save left behind (rank 0; call before training starts, with no save of
        this manager in flight)."""
        self.wait()
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".tmp_", ".trash_")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    @property
    def in_flight(self) -> bool:
        """A background save is still being written or published."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> float:
        """Wait for the save in flight (if any); returns the seconds waited. A failed background save raises
        CheckpointError here (on every rank)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            pending.result()
        finally:
            self._pending_name = None
        return time.perf_counter() - t0

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Checkpoint ``step``; returns its final path (written by the time this returns, or when
        ``async_save``, once `wait` returns)."""
        t0 = time.perf_counter()
        self.last_wait_s = self.wait()
        name = step_dir_name(step)
        final = self.dir / name
        tmp = self.dir / f".tmp_{name}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=state_dict_options(model))
        model_sd = drop_frozen(model, model_sd)
        state = {"model": model_sd, "optim": optim_sd["state"]}
        rank_name = f"rank_{self.rank:05d}.json"
        rank_text = json.dumps(to_jsonable(rank_state))  # taken now; an async save writes it in the background
        full_meta = dict(to_jsonable(meta), step=step, complete=True,
                         world_size=dist.get_world_size() if _dist() else 1)
        writer = HashingWriter(tmp)
        if not self.async_save:
            atomic_write_text(tmp / rank_name, rank_text)
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
                dcp.save(state, checkpoint_id=str(tmp), storage_writer=writer)
            digests = _gather_digests({**writer.digests, rank_name: _text_digest(rank_text)})
            if self.rank == 0:
                self._publish(name, tmp, final, full_meta, digests)
            _barrier()
            self.last_stall_s = time.perf_counter() - t0
            return final
        group = self._async_group()
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)  # the save runs in DCP's thread
        stager = self._stager()
        response = dcp.async_save(state, checkpoint_id=str(tmp), storage_writer=writer, process_group=group,
                                  **({"async_stager": stager} if stager is not None else {}))
        upload = response.upload_completion if hasattr(response, "upload_completion") else response
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-checkpoint")
        self._pending_name = name
        self._pending = self._executor.submit(self._complete, upload, writer, rank_name, rank_text, name, tmp,
                                              final, full_meta, group, t0)
        self.last_stall_s = time.perf_counter() - t0
        return final

    def _stager(self) -> Any:
        """The host copy's buffers, kept from one save to the next (no new allocation, page faults or pinning
        per save; pinned memory on CUDA for a faster device-to-host copy). None on a torch without DCP's
        DefaultStager: the writer then stages into fresh buffers each time."""
        if self._staging is None:
            try:
                from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
            except ImportError:
                return None
            self._staging = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                         use_shared_memory=False, use_async_staging=False,
                                                         use_non_blocking_copy=False))
        return self._staging

    def close(self) -> None:
        """Wait for the save in flight, then free the host copy's buffers (the run is done saving)."""
        self.wait()
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def _async_group(self) -> Any:
        """A gloo group of its own for the background saves: their collectives never interleave with the
        training loop's on the default group (and DCP's async save needs a CPU backend). All ranks call it."""
        if self._group is None:
            self._group = side_group("gloo")  # None in a single process
        return self._group

    def _complete(self, upload: Future, writer: HashingWriter, rank_name: str, rank_text: str, name: str,
                  tmp: Path, final: Path, full_meta: dict[str, Any], group: Any, t0: float) -> Path:
        """The background half of an async save, on every rank: wait for DCP's write, pool the digests,
        rank 0 publishes (meta.json, manifest, rename, LATEST, prune), and every rank learns the outcome."""
        error = None
        try:
            atomic_write_text(tmp / rank_name, rank_text)  # off the training thread (it fsyncs)
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
        try:
            upload.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP reports a failed rank on every rank
            error = error or _reason(e)
        # every rank takes part whatever happened on it: its digests, or why it has none
        parts = _all_gather({"error": error, "files": {} if error else
                             {**writer.digests, rank_name: _text_digest(rank_text)}}, group)
        error = next((p["error"] for p in parts if p["error"]), None)
        if error is None and self.rank == 0:
            try:
                self._publish(name, tmp, final, full_meta, {n: e for p in parts for n, e in p["files"].items()})
            except Exception as e:  # noqa: BLE001 - the other ranks wait for this outcome: never skip the broadcast
                error = f"{type(e).__name__}: {e}"
        if _dist() and dist.get_world_size(group) > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0, group=group)  # rank 0's outcome, to every rank
            error = box[0]
        if error is not None:
            raise CheckpointError(f"the checkpoint of {name} was not saved ({error}); LATEST still names the "
                                  f"previous one; check free space and permissions of {self.dir}")
        self.last_write_s = time.perf_counter() - t0
        return final

    def _publish(self, name: str, tmp: Path, final: Path, full_meta: dict[str, Any],
                 digests: dict[str, dict[str, Any]]) -> None:
        """Rank 0, once every rank's files are written: meta.json, then MANIFEST.json (from the digests taken
        while writing), rename into place, move LATEST, prune."""
        meta_text = json.dumps(dict(full_meta, saved_at=time.time()), indent=1)
        atomic_write_text(tmp / META, meta_text)
        write_manifest(tmp, {**digests, META: _text_digest(meta_text)})  # last: without it nothing counts
        _fsync_dir(tmp)
        if final.exists():  # a complete-but-unreferenced save of this step from an interrupted run
            _remove_dir(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        atomic_write_text(self.dir / LATEST, name + "\n")
        self.prune()

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints and every ``keep_every``-th step; never delete
        the one LATEST names nor one being written."""
        latest = latest_checkpoint(self.dir, verify=False)
        found = list_checkpoints(self.dir)
        kept = keep_set([step for step, _ in found], self.keep_last, self.keep_every)
        for step, path in found:
            if step in kept or path.name == self._pending_name:
                continue
            if latest is not None and path.resolve() == latest.resolve():
                continue
            _remove_dir(path)

    def load(self, path: str | os.PathLike, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model (+ optimizer) state in place; returns (meta, this rank's state). A save of this manager
        still in flight is waited for first (it may be the one asked for)."""
        self.wait()
        path = Path(path)
        meta = read_meta(path)
        read_dcp_index(path / DCP_INDEX)  # refuses a hostile or truncated index before DCP touches it
        options = state_dict_options(model)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=options) if optimizer is not None else (
            get_state_dict(model, [], options=options)[0], None)
        model_sd = drop_frozen(model, model_sd)
        state = {"model": model_sd}
        if optim_sd is not None:
            state["optim"] = optim_sd["state"]
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*single process.*")
                dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
        except UserError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - any DCP failure (a BaseException) -> UserError
            raise UserError(f"checkpoint '{path}' does not fit this model/optimizer ({_reason(e)}); "
                            "resume with the config it was trained with or start a new run.dir") from None
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict={"state": state["optim"], "param_groups": optim_sd["param_groups"]},
                           options=options)
        else:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(model, state["model"], options=options)
        rank_file = path / f"rank_{self.rank:05d}.json"
        if not rank_file.is_file():
            rank_file = path / "rank_00000.json"  # resumed on more ranks than it was saved with
        rank_state = read_json_bounded(rank_file, what="checkpoint rank state") if rank_file.is_file() else {}
        return meta, rank_state
