"""Which checkpoint a run resumes from (``train.resume``), and whether that checkpoint's math matches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError
from lmforge.train import checkpoint as ckpt


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from per ``train.resume`` (auto | never | PATH), or None for a fresh start."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if resume == "never":
        if ckpt.latest_checkpoint(ckpt_dir) is not None:
            raise ConfigError(f"train.resume=never but run.dir '{run_dir}' already holds checkpoints; use "
                              "train.resume=auto to continue it, choose another run.dir, or delete its checkpoints/")
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(ckpt_dir)
    return ckpt.resolve_checkpoint(resume)


def check_compatible(path: Path, math_fields: dict[str, Any], allow: Iterable[str] = ()) -> list[str]:
    """Refuse a checkpoint whose math-changing fields differ (naming the first one) unless allowed.
    Returns notes about the allowed differences."""
    saved = ckpt.read_meta(path).get("math", {})
    allow = set(allow)
    notes = []
    for key in sorted(set(saved) | set(math_fields)):
        old, new = saved.get(key), math_fields.get(key)
        if old == new:
            continue
        if key in allow:
            notes.append(f"{key}: {old!r} -> {new!r} (allowed by checkpoint.allow_mismatch)")
            continue
        raise ConfigError(f"checkpoint '{path}' was trained with {key}={old!r} but the config says {new!r}; "
                          f"resume with the same value, start a new run.dir, or override with "
                          f"checkpoint.allow_mismatch=[{key}]")
    return notes


def _changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{k}.")
        elif a != b and not (prefix == "train." and k == "resume"):
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
