"""Make this Python look like the GPU machines: only torch (with its own dependencies), numpy, pyyaml,
safetensors and pytest import; every other third-party package is absent.

Put this folder first on PYTHONPATH (`DEVICE_ONLY=1 bash bench/gpu_check.sh` does) and Python imports this
file at start-up. It swaps each site-packages folder on ``sys.path`` for a folder of links to the allowed
packages only (beside ``$LMFORGE_DEVICE_ONLY_DIR``, default the temp dir), so a blocked package is absent
exactly as on the device (``importlib.util.find_spec`` gives None, ``import`` raises ModuleNotFoundError).
Every top-level name that was looked for and not found is appended to $LMFORGE_BLOCKED_LOG (when set), one
per line: what lmforge and torch tried to import and did without (an import inside a ``try`` that falls
back is fine; one that is not shows up as the run's failure).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import os
import re
import sys
import tempfile

# What the device has: torch and the packages its wheel depends on, numpy, pyyaml, safetensors, pytest
# (and its own dependencies). The checkout itself comes from PYTHONPATH.
ALLOWED = {
    "torch", "torchgen", "functorch", "triton", "nvidia", "filelock", "typing_extensions", "sympy", "mpmath",
    "networkx", "jinja2", "markupsafe", "fsspec", "setuptools", "pkg_resources", "_distutils_hack",
    "numpy", "numpy.libs", "yaml", "_yaml", "safetensors",
    "pytest", "_pytest", "py", "pluggy", "iniconfig", "packaging", "exceptiongroup", "tomli", "pygments",
}
_DIST = re.compile(r"^(.+?)-[^-]+\.dist-info$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _allowed_entry(name: str) -> bool:
    m = _DIST.match(name)
    if m:
        dist = _norm(m.group(1))
        return dist in {_norm(a) for a in ALLOWED} or dist in ("pyyaml", "typing_extensions")
    top = name.split(".")[0] if not name.endswith(".libs") else name
    return top in ALLOWED or name in ALLOWED


def _shadow(site: str) -> str:
    base = os.environ.get("LMFORGE_DEVICE_ONLY_DIR") or tempfile.gettempdir()
    tag = hashlib.sha1(f"{site}|{sorted(ALLOWED)}".encode()).hexdigest()[:12]
    shadow = os.path.join(base, f"lmforge-device-only-{tag}")
    if not os.path.isdir(shadow):
        tmp = f"{shadow}.{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for name in os.listdir(site):
            if _allowed_entry(name):
                os.symlink(os.path.join(site, name), os.path.join(tmp, name))
        try:
            os.rename(tmp, shadow)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return shadow


class _LogMissing(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: reached only when no finder found the module; records its name."""

    def find_spec(self, fullname, path=None, target=None):
        log = os.environ.get("LMFORGE_BLOCKED_LOG")
        if log and "." not in fullname:
            with open(log, "a", encoding="utf-8") as f:
                f.write(fullname + "\n")


sys.path[:] = [_shadow(p) if os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")
               and os.path.isdir(p) else p for p in sys.path]
sys.path_importer_cache.clear()
# modules the .pth files already imported (editable installs' finders) keep working; drop their finders
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.meta_path.append(_LogMissing())
