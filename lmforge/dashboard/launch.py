"""Launching and stopping `lmforge pretrain` from the dashboard (only with ``--allow-launch``).

* :func:`fields` — the form: every key of a packaged pretrain recipe's config (the ``PretrainConfig``
  dataclasses, recipe values applied) with its value and type.
* :func:`check` — the overrides validated by the very loader the CLI uses (``lmforge.train.config.load_config``),
  so a bad value is refused with the CLI's own one-line message.
* :class:`Launcher` — starts ``python -m lmforge pretrain --config RECIPE KEY=VALUE … run.dir=ROOT/NAME`` as a
  child process (its output in ``ROOT/.dashboard-logs/NAME.log``, beside the run dir, never inside it: the run
  dir is the pretrain command's own output), and stops one it started with SIGTERM (the trainer checkpoints
  and exits; running the same command again resumes). Processes the dashboard did not start are never signalled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, UserError, recipe_names, to_dict
from lmforge.dashboard.runs import flatten
from lmforge.train.config import load_config

VERBS = ("pretrain",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")
LOG_DIR = ".dashboard-logs"
MAX_OVERRIDES = 200


def recipes() -> list[str]:
    return [r for r in recipe_names() if r.startswith("pretrain/")]


def _type(v: Any) -> str:
    return ("bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float)
            else "str" if isinstance(v, str) else "null" if v is None else "list" if isinstance(v, list) else "dict")


def fields(recipe: str) -> list[dict[str, Any]]:
    """[{"key", "value", "type"}] of the recipe's whole config, in the dataclasses' order."""
    if recipe not in recipes():
        raise UserError(f"unknown recipe '{recipe[:100]}'; pick one of {', '.join(recipes())}")
    cfg = load_config(recipe, ["run.dir=RUN"])
    return [{"key": k, "value": v, "type": _type(v)} for k, v in flatten(to_dict(cfg)).items()
            if not k.startswith("run.dir")]


def overrides_of(body: dict[str, Any]) -> list[str]:
    raw = body.get("overrides") or {}
    if not isinstance(raw, dict) or len(raw) > MAX_OVERRIDES:
        raise UserError(f"overrides must be an object of at most {MAX_OVERRIDES} 'section.key': 'value' pairs")
    out = []
    for k, v in raw.items():
        if not isinstance(k, str) or not KEY_RE.match(k) or k == "run.dir":
            raise UserError(f"'{str(k)[:100]}' is not a config key to set here (section.key; run.dir comes from "
                            "the run name)")
        out.append(f"{k}={v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}")
    return out


def check(body: dict[str, Any], root: Path) -> tuple[str, list[str], Path]:
    """(recipe, overrides, run dir) of a launch request, or a one-line UserError / ConfigError."""
    if body.get("verb", "pretrain") not in VERBS:
        raise UserError(f"verb '{str(body.get('verb'))[:50]}' cannot be launched here; pick one of {', '.join(VERBS)}")
    recipe = body.get("recipe")
    if recipe not in recipes():
        raise UserError(f"unknown recipe '{str(recipe)[:100]}'; pick one of {', '.join(recipes())}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"run name '{str(name)[:100]}' must be letters, digits, '.', '_' or '-' (at most 100), "
                        "not starting with '.' or '-'")
    run_dir = root / name
    if run_dir.exists():
        raise UserError(f"{run_dir} exists; pick another run name (or resume it with the same command on the CLI)")
    overrides = overrides_of(body)
    load_config(recipe, [*overrides, f"run.dir={run_dir}"])  # ConfigError: the CLI's own message
    return recipe, overrides, run_dir


class Launcher:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[Path, subprocess.Popen] = {}

    def launch(self, body: dict[str, Any]) -> dict[str, Any]:
        recipe, overrides, run_dir = check(body, self.root)
        logs = self.root / LOG_DIR
        logs.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "lmforge", "pretrain", "--config", recipe, *overrides, f"run.dir={run_dir}"]
        with open(logs / f"{run_dir.name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.procs[run_dir.resolve()] = proc
        return {"pid": proc.pid, "run_dir": str(run_dir), "command": " ".join(["lmforge", *cmd[3:]])}

    def stop(self, run_dir: Path) -> dict[str, Any]:
        proc = self.procs.get(run_dir)
        if proc is None:
            raise UserError(f"{run_dir} was not launched by this dashboard; stop it where it runs (Ctrl-C or "
                            "kill -TERM PID)")
        if proc.poll() is not None:
            return {"pid": proc.pid, "exited": proc.returncode}
        proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits
        return {"pid": proc.pid, "signalled": "SIGTERM"}

    def reap(self) -> None:
        for proc in self.procs.values():
            proc.poll()

    def close(self) -> None:
        """On the dashboard's exit: its runs are left to finish (they are separate sessions)."""
        self.reap()


__all__ = ["ConfigError", "Launcher", "check", "fields", "recipes"]
