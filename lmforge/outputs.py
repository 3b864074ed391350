"""Guarded outputs: no command writes over what it did not create, over its own inputs, or into /proc.

Every command that writes calls one of these before it builds anything:

* :func:`guard_output_dir` — a one-shot output dir (``import``, ``export``, ``prepare``, ``tokenizer
  train``): an existing non-empty target is refused unless ``--overwrite``.
* :func:`guard_output_file` — a single output file (``eval --out``): an existing non-empty file is
  refused unless it is one this command wrote before (``ours``) or ``--overwrite``.
* :func:`run_dir_claim` / :func:`claim_run_dir` — a pretrain/fine-tune run dir: created with a marker file
  (:data:`RUN_MARKER`) so that a later ``resume=auto`` recognises it as a run; an existing non-empty
  folder without the marker is refused unless ``run.overwrite: true``.

All of them refuse a target that is one of the command's inputs, holds one (writing it would replace
the input) or sits inside an input dir. They delete nothing: the writers themselves build into a temp
dir beside the target and rename (``lmforge.atomic``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lmforge.atomic import atomic_write_text
from lmforge.config import UserError

RUN_MARKER = ".lmforge_run.json"
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")
_NOT_LOCAL = ("://", "hf:")


def _resolve(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve(strict=False)


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _local_inputs(inputs: Iterable[str | os.PathLike | None]) -> list[tuple[str, Path]]:
    """(as given, resolved) for every input that is a local path; globs are cut at the first wildcard."""
    out = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        text = str(item)
        if any(m in text for m in _NOT_LOCAL):
            continue
        for i, ch in enumerate(text):
            if ch in "*?[":
                text = os.path.dirname(text[:i]) or "."
                break
        out.append((str(item), _resolve(text)))
    return out


def check_location(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse system pseudo-filesystems and places that cannot hold the output; return the resolved path."""
    target = _resolve(out)
    for root in _SYSTEM_ROOTS:
        if _within(target, Path(root)):
            raise UserError(f"{flag} '{out}' is under {root}, which holds no user files; choose a directory "
                            "you own")
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != target and not ancestor.is_dir():
        raise UserError(f"{flag} '{out}' cannot be created: '{ancestor}' is a file, not a directory")
    if not os.access(ancestor if ancestor != target else target.parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} '{out}' is not writable (no write permission on '{ancestor}'); "
                        "choose a directory you own")
    return target


def check_not_an_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], flag: str = "--out",
                       inside_ok: bool = False) -> None:
    """Refuse ``out`` when it is an input, holds one, or (unless ``inside_ok``) lies inside an input dir."""
    target = _resolve(out)
    for given, inp in _local_inputs(inputs):
        if target == inp:
            raise UserError(f"{flag} '{out}' is one of this command's inputs; writing it would destroy it — "
                            f"choose another {flag}")
        if _within(inp, target):
            raise UserError(f"{flag} '{out}' holds the input '{given}'; writing it would replace that input — "
                            f"choose another {flag}")
        if not inside_ok and inp.is_dir() and _within(target, inp):
            raise UserError(f"{flag} '{out}' is inside the input dir '{given}', which must stay unchanged — "
                            f"choose a {flag} outside it")


def _non_empty(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return True


def guard_output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                     overwrite: bool = False, flag: str = "--out") -> Path:
    """Check a one-shot output dir before any work; see the module doc."""
    if str(out).strip() == "":
        raise UserError(f"{flag} is empty; pass a directory path")
    target = check_location(out, flag)
    check_not_an_input(out, inputs, flag)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} '{out}' exists and is a file; pass a directory path")
    if _non_empty(target) and not overwrite:
        raise UserError(f"{flag} '{out}' already exists and is not empty; pass --overwrite to replace it, "
                        f"or choose a new {flag}")
    return Path(out)


def guard_output_file(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (),
                      overwrite: bool = False, flag: str = "--out",
                      ours: Callable[[Path], bool] = lambda p: False) -> Path:
    """Check an output file before any work; ``ours(path)`` says an existing file is this command's own."""
    if str(out).strip() == "":
        raise UserError(f"{flag} is empty; pass a file path")
    target = check_location(out, flag)
    check_not_an_input(out, inputs, flag, inside_ok=True)
    if target.is_dir():
        raise UserError(f"{flag} '{out}' is a directory; pass a file path")
    if target.exists() and target.stat().st_size > 0 and not overwrite and not ours(target):
        raise UserError(f"{flag} '{out}' already exists and was not written by lmforge; pass --overwrite to "
                        f"replace it, or choose a new {flag}")
    return Path(out)


def _is_legacy_run(path: Path) -> bool:
    """A run dir written before run markers existed: it has checkpoints or a metrics log."""
    return (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_MARKER).is_file() or _is_legacy_run(Path(path))


# What a run writes inside its dir (trainer, fine-tune recipes, report); an input there would be replaced.
RUN_OUTPUTS = ("model", "checkpoints", "adapter", "best", "config.yaml", "metrics.jsonl", "report.png", "report.md")


def _check_run_inputs(run_dir: str | os.PathLike, target: Path, inputs: Iterable[str | os.PathLike | None],
                      key: str) -> None:
    """A run dir is written file by file, not replaced: an input may live inside it (quickstart keeps its
    shards in RUN/data/), but not at one of the run's own output paths, and the run dir may not be an
    input or lie inside an input dir."""
    for given, inp in _local_inputs(inputs):
        if target == inp:
            raise UserError(f"{key}='{run_dir}' is one of this command's inputs; choose another {key}")
        if _within(inp, target) and inp.relative_to(target).parts[0] in RUN_OUTPUTS:
            raise UserError(f"{key}='{run_dir}' holds the input '{given}' at "
                            f"{inp.relative_to(target).parts[0]}/, which this run replaces; copy the input "
                            f"elsewhere or choose another {key}")
        if inp.is_dir() and _within(target, inp):
            raise UserError(f"{key}='{run_dir}' is inside the input dir '{given}', which must stay unchanged; "
                            f"choose a {key} outside it")


def claim_run_dir(run_dir: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, key: str = "run.dir") -> tuple[bool, bool]:
    """Create (or accept) ``run_dir`` for ``command`` (e.g. ``lmforge pretrain``) and mark it as a run.
    Returns (created the dir, wrote the marker) so a failed start can undo exactly that.

    Only rank 0 (``RANK`` unset or 0) creates and marks; other ranks check the inputs only."""
    if str(run_dir).strip() == "":
        raise UserError(f"{key} is empty; set it to a directory path")
    target = check_location(run_dir, key)
    _check_run_inputs(run_dir, target, inputs, key)
    if os.environ.get("RANK", "0") != "0":
        return False, False
    if target.exists() and not target.is_dir():
        raise UserError(f"{key}='{run_dir}' is a file; set it to a directory path")
    marker = target / RUN_MARKER
    if marker.is_file():
        return False, False
    if _non_empty(target) and not _is_legacy_run(target) and not overwrite:
        how = ("; choose a new run.dir, or set run.overwrite=true to write into it (its config.yaml, model/ and "
               "checkpoints/ would be replaced)") if key == "run.dir" else f"; choose a new {key}"
        raise UserError(f"{key}='{run_dir}' exists, is not empty and is not an lmforge run dir{how}")

    existed = target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"created_by": command, "created_at": time.time()}) + "\n")
    except OSError as e:
        raise UserError(f"{key}='{run_dir}' cannot be created ({e.strerror}); choose a directory you own") from None
    return not existed, True


@contextlib.contextmanager
def run_dir_claim(run_dir: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, key: str = "run.dir") -> Iterator[Path]:
    """``with run_dir_claim(...):`` run the command. When it is refused (a UserError) before its first
    checkpoint, what this call created goes again: the whole run dir if this call created it (everything
    in it was written by this run), else just the marker when nothing else was written. Any other
    failure (a crash, a signal) leaves the run dir as it is, for ``resume=auto``."""
    created_dir, wrote_marker = claim_run_dir(run_dir, command, inputs, overwrite, key)
    try:
        yield Path(run_dir)
    except BaseException as e:
        target = Path(run_dir)
        if wrote_marker and target.is_dir():
            if created_dir and isinstance(e, UserError) and not (target / "checkpoints").exists():
                shutil.rmtree(target, ignore_errors=True)
            elif [p.name for p in target.iterdir()] == [RUN_MARKER]:
                (target / RUN_MARKER).unlink()
                if created_dir:
                    target.rmdir()
        raise
