"""Guarded outputs: no command writes over what it did not create, over its own inputs, or into /proc.

Every command that writes calls one of these before it builds anything:

* :func:`guard_output_dir` — a one-shot output dir (``import``, ``export``, ``prepare``, ``tokenizer
  train``): an existing non-empty target is refused unless ``--overwrite``.
* :func:`guard_output_file` — a single output file (``eval --out``): an existing non-empty file is
  refused unless it is one this command wrote before (``ours``) or ``--overwrite``.
* :func:`run_dir_claim` / :func:`claim_run_dir` — a pretrain/fine-tune run dir: created with a marker file
  (:data:`RUN_MARKER`) so that a later ``resume=auto`` recognises it as a run; an existing non-empty
  folder without the marker is refused unless ``run.overwrite: true``. ``run_dir_claim`` also holds the
  run dir's lock (``RUN/.lmforge.lock``, :mod:`lmforge.lock`) for the command's whole life.
* :func:`exclusive_output` — a one-shot output dir while it is written: its sibling lock ``.OUT.lock``
  is held and, without ``--overwrite``, the final rename never replaces what appeared meanwhile.

All of them refuse a target that is one of the command's inputs, holds one (writing it would replace
the input) or sits inside an input dir. They delete nothing: the writers themselves build into a temp
dir beside the target and rename (``lmforge.atomic``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from lmforge.atomic import atomic_write_text, no_replace
from lmforge.config import UserError
from lmforge.lock import LOCK_NAME, acquire, locked, output_lock_path, run_dir_lock_path

RUN_MARKER = ".lmforge_run.json"
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")
_NOT_LOCAL = ("://", "hf:")


def _resolve(p: str | os.PathLike) -> Path:
    try:
        return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a symbolic link loop: RuntimeError before Python 3.13, ELOOP after
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise UserError(f"'{p}' is (or passes through) a symbolic link loop; fix the link or pass another "
                        "path") from None


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


def _non_empty(path: Path, ignore: tuple[str, ...] = ()) -> bool:
    try:
        return path.is_dir() and any(p.name not in ignore for p in path.iterdir())
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


def _check_run_dir(run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], overwrite: bool,
                   key: str) -> Path | None:
    """Every check of :func:`claim_run_dir`, nothing written; None on ranks other than 0."""
    if str(run_dir).strip() == "":
        raise UserError(f"{key} is empty; set it to a directory path")
    target = check_location(run_dir, key)
    _check_run_inputs(run_dir, target, inputs, key)
    if os.environ.get("RANK", "0") != "0":
        return None
    if target.exists() and not target.is_dir():
        raise UserError(f"{key}='{run_dir}' is a file; set it to a directory path")
    if (not (target / RUN_MARKER).is_file() and _non_empty(target, ignore=(LOCK_NAME,))
            and not _is_legacy_run(target) and not overwrite):
        how = ("; choose a new run.dir, or set run.overwrite=true to write into it (its config.yaml, model/ and "
               "checkpoints/ would be replaced)") if key == "run.dir" else f"; choose a new {key}"
        raise UserError(f"{key}='{run_dir}' exists, is not empty and is not an lmforge run dir{how}")
    return target


def _mark_run_dir(target: Path, run_dir: str | os.PathLike, command: str, key: str) -> bool:
    """Create ``target`` and write its marker unless it has one; True when the marker was written."""
    marker = target / RUN_MARKER
    if marker.is_file():
        return False
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"created_by": command, "created_at": time.time()}) + "\n")
    except OSError as e:
        raise UserError(f"{key}='{run_dir}' cannot be created ({e.strerror}); choose a directory you own") from None
    return True


def claim_run_dir(run_dir: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, key: str = "run.dir") -> tuple[bool, bool]:
    """Create (or accept) ``run_dir`` for ``command`` (e.g. ``lmforge pretrain``) and mark it as a run.
    Returns (created the dir, wrote the marker) so a failed start can undo exactly that. Takes no lock
    (:func:`run_dir_claim` does).

    Only rank 0 (``RANK`` unset or 0) creates and marks; other ranks check the inputs only."""
    target = _check_run_dir(run_dir, inputs, overwrite, key)
    if target is None:
        return False, False
    existed = target.exists()
    wrote = _mark_run_dir(target, run_dir, command, key)
    return wrote and not existed, wrote


def _remove_dir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def run_dir_claim(run_dir: str | os.PathLike, command: str, inputs: Iterable[str | os.PathLike | None] = (),
                  overwrite: bool = False, key: str = "run.dir") -> Iterator[Path]:
    """``with run_dir_claim(...):`` run the command, holding the run dir's lock (``RUN/.lmforge.lock``,
    :mod:`lmforge.lock`) throughout: a second command on the same run dir is refused naming this one.
    Under torchrun only rank 0 takes the lock (the ranks of one run write one run dir together).

    When the command is refused (a UserError) before its first checkpoint, what this call created goes
    again: the whole run dir if this call created it (everything in it was written by this run), else
    just the marker when nothing else was written. Any other failure (a crash, a signal) leaves the run
    dir as it is, for ``resume=auto``."""
    target = _check_run_dir(run_dir, inputs, overwrite, key)
    if target is None:  # a rank other than 0
        yield Path(run_dir)
        return
    existed = target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}='{run_dir}' cannot be created ({e.strerror}); choose a directory you own") from None
    try:
        lock = acquire(run_dir_lock_path(target), command, f"{key}='{run_dir}'", f"choose another {key}")
    except BaseException:
        if not existed:
            _remove_dir_if_empty(target)
        raise
    remove_dir = False
    try:
        _check_run_dir(run_dir, inputs, overwrite, key)  # again, now that no other lmforge writes it
        wrote_marker = _mark_run_dir(target, run_dir, command, key)
        created_dir = wrote_marker and not existed
        try:
            yield Path(run_dir)
        except BaseException as e:
            if wrote_marker and target.is_dir():
                others = [p for p in target.iterdir() if p.name != LOCK_NAME]
                if created_dir and isinstance(e, UserError) and not (target / "checkpoints").exists():
                    for p in others:  # everything but the lock file, which goes when the lock is released
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)
                    remove_dir = True
                elif [p.name for p in others] == [RUN_MARKER]:
                    (target / RUN_MARKER).unlink()
                    remove_dir = created_dir
            raise
    except BaseException:
        if not existed and not (target / RUN_MARKER).exists():
            remove_dir = True
        raise
    finally:
        lock.release()
        if remove_dir:
            _remove_dir_if_empty(target)


@contextlib.contextmanager
def exclusive_output(out: str | os.PathLike, command: str, overwrite: bool = False,
                     flag: str = "--out") -> Iterator[Path]:
    """``with exclusive_output(out, "lmforge export", overwrite):`` write the one-shot output dir ``out``
    (after :func:`guard_output_dir`) holding its sibling lock ``.OUT.lock``: a second writer is refused
    naming this one. Without ``overwrite`` the final rename of :func:`lmforge.atomic.atomic_directory`
    into ``out`` never replaces a dir that appeared meanwhile."""
    with locked(output_lock_path(out), command, f"{flag} '{out}'", f"choose another {flag}"):
        if _non_empty(Path(out)) and not overwrite:  # written meanwhile, by a writer that has finished
            raise UserError(f"{flag} '{out}' already exists and is not empty; pass --overwrite to replace it, "
                            f"or choose a new {flag}")
        if overwrite:
            yield Path(out)
        else:
            with no_replace(out, flag):
                yield Path(out)
