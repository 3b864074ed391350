"""Writes that never leave a half-written result: temp file/dir beside the target, then rename.

A one-shot output (``prepare --out``, ``export --out``) must not replace a dir that appeared while it was
being built (another writer, or the user): :func:`swap_into_place` with ``overwrite=False`` renames with
:func:`rename_noreplace`, so the no-overwrite check and the rename are one atomic step.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import UserError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2 = None  # libc's renameat2 (glibc >= 2.28) once looked up; False where there is none


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    return _renameat2 or None


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` to ``dst`` in one atomic step that fails with FileExistsError when ``dst`` exists
    (a file, a dir — even an empty one — or a link). Linux ``renameat2(RENAME_NOREPLACE)``; where the kernel
    or filesystem lacks it, check then rename (a dir is still never renamed over a non-empty dir: rename(2)
    itself refuses that)."""
    fn = _libc_renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            if err == errno.EEXIST:
                raise FileExistsError(err, os.strerror(err), str(dst))
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


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


def swap_into_place(tmp: str | os.PathLike, out: str | os.PathLike, overwrite: bool = True,
                    flag: str = "--out") -> Path:
    """Rename the finished ``tmp`` dir to ``out``, replacing an existing ``out`` only at the last moment.

    ``overwrite=False``: an empty ``out`` dir is replaced, anything else that is there now (it may have
    appeared after the command's start-up check) is left alone and a UserError is raised; ``tmp`` stays
    for the caller to remove."""
    tmp, out = Path(tmp), Path(out)
    if not overwrite:
        if out.is_dir() and not out.is_symlink():
            with contextlib.suppress(OSError):
                out.rmdir()  # an empty dir (the guard allows one); a non-empty one stays and is refused below
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise UserError(f"{flag} '{out}' appeared while this command was writing it (another writer?) and "
                            f"was left as it is; pass --overwrite to replace it, or choose a new {flag}") from None
        return out
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


# Outputs whose final rename must not replace what is there: resolved path -> the option to name.
# Set by lmforge.outputs.exclusive_output for the command's --out (e.g. `export` without --overwrite).
_NO_REPLACE: dict[str, str] = {}


def _key(out: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(str(out)))


@contextmanager
def no_replace(out: str | os.PathLike, flag: str = "--out") -> Iterator[None]:
    """While active, :func:`atomic_directory` renames into ``out`` only where nothing is (see
    :func:`swap_into_place`)."""
    key = _key(out)
    previous = _NO_REPLACE.get(key)
    _NO_REPLACE[key] = flag
    try:
        yield
    finally:
        if previous is None:
            _NO_REPLACE.pop(key, None)
        else:
            _NO_REPLACE[key] = previous


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool | None = None) -> Iterator[Path]:
    """``with atomic_directory(out) as tmp:`` fill ``tmp``; on success it becomes ``out``, on any
    error (or interrupt) it is removed and an existing ``out`` is left untouched. ``overwrite`` (default:
    True unless ``out`` is under :func:`no_replace`) is :func:`swap_into_place`'s."""
    flag = _NO_REPLACE.get(_key(out))
    if overwrite is None:
        overwrite = flag is None
    tmp = make_temp_dir(out)
    try:
        yield tmp
        swap_into_place(tmp, out, overwrite=overwrite, flag=flag or "--out")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
