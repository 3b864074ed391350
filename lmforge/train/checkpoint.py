"""Checkpoints: torch.distributed.checkpoint (DCP) shards + JSON metadata, written so a kill at any
moment leaves ``LATEST`` pointing at a complete, loadable checkpoint.

Layout of one checkpoint (``RUN/checkpoints/step_000500/``)::

    __0_0.distcp ...   DCP shards: model parameters and optimizer state (tensors only)
    .metadata          DCP's own index
    rank_00000.json    per-rank state: data-loader position, RNG states (base64), ...
    meta.json          step, tokens, config + its hash, trainer state; written last

Save order: everything goes into ``.tmp_step_000500/``; meta.json is written last inside it; the
directory is renamed into place; only then is ``LATEST`` replaced (temp file + atomic rename). Old
checkpoints are pruned after that, keeping the newest ``keep_last`` and never the one LATEST names.

Only tensors go through DCP (loaded with ``weights_only=True``); everything else is JSON. DCP's
``.metadata`` index is PyTorch's own format.

Frozen parameters (a LoRA run's base weights, a frozen backbone) are not saved: they come from the model
dir the run started from, so a LoRA checkpoint holds only the adapters (and head) and their optimizer state.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmforge.config import UserError, atomic_write_text

LATEST = "LATEST"
META = "meta.json"
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


# ---- finding checkpoints ----------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    """A checkpoint is complete when its meta.json (written last) says so and DCP's index exists."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete")) and (path / ".metadata").is_file()


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The checkpoint LATEST names; if LATEST is missing or broken, the newest complete one (or None)."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name and is_complete(ckpt_dir / name):
            return ckpt_dir / name
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint dir, a checkpoints/ dir (its LATEST) or a run dir (its checkpoints/LATEST)."""
    p = Path(path)
    if is_complete(p):
        return p
    for candidate in (p, p / "checkpoints"):
        found = latest_checkpoint(candidate)
        if found is not None:
            return found
    raise UserError(f"'{path}' holds no complete checkpoint (need meta.json + DCP shards, or a LATEST file); "
                    "pass a step_NNNNNN dir, a checkpoints/ dir or a run dir")


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


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


class CheckpointManager:
    """Saves and loads training state under ``ckpt_dir`` (all ranks call save/load together)."""

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int = 3, rank: int = 0):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank

    def clean_partial(self) -> None:
        """Remove temp dirs a killed save left behind (rank 0; call before training starts)."""
        if self.rank == 0 and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith((".tmp_", ".trash_")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
        _barrier()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any], rank_state: dict[str, Any]) -> Path:
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
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=str(tmp))
        atomic_write_text(tmp / f"rank_{self.rank:05d}.json", json.dumps(to_jsonable(rank_state)))
        _barrier()
        if self.rank == 0:
            full_meta = dict(to_jsonable(meta), step=step, saved_at=time.time(), complete=True,
                             world_size=dist.get_world_size() if _dist() else 1)
            atomic_write_text(tmp / META, json.dumps(full_meta, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # a complete-but-unreferenced save of this step from an interrupted run
                trash = self.dir / f".trash_{name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
            atomic_write_text(self.dir / LATEST, name + "\n")
            self.prune()
        _barrier()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; never delete the one LATEST names."""
        latest = latest_checkpoint(self.dir)
        found = list_checkpoints(self.dir)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            if latest is not None and path.resolve() == latest.resolve():
                continue
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str | os.PathLike, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load model (+ optimizer) state in place; returns (meta, this rank's state)."""
        path = Path(path)
        meta = read_meta(path)
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
                dcp.load(state, checkpoint_id=str(path))
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
        rank_state = json.loads(rank_file.read_text()) if rank_file.is_file() else {}
        return meta, rank_state
