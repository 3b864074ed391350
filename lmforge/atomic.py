"""Writes that never leave a half-written result: temp file/dir beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync, then rename over it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def make_temp_dir(out: str | os.PathLike) -> Path:
    """An empty directory beside ``out`` (same filesystem, so the final rename is atomic), with the
    ordinary permissions a user's umask gives (mkdtemp alone makes it private)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def swap_into_place(tmp: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Rename the finished ``tmp`` dir to ``out``, replacing an existing ``out`` only at the last moment."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` fill ``tmp``; on success it becomes ``out``, on any
    error (or interrupt) it is removed and an existing ``out`` is left untouched."""
    tmp = make_temp_dir(out)
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
