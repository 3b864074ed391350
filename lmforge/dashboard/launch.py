"""Launching and stopping `lmforge pretrain` / `lmforge finetune` from the dashboard (only with ``--allow-launch``).

* :func:`fields` — the form: every key of a packaged recipe's config (the config dataclasses, recipe values
  applied) with its value and type (a finetune recipe's come from ``lmforge finetune --check --json``: the
  dashboard, a layer-4 package like ``lmforge.tasks``, never imports it).
* :func:`check` — the overrides validated by the CLI itself (``lmforge VERB --config RECIPE … --check``, in a
  child process), so a bad value is refused with the CLI's own one-line message.
* :func:`plan` — the planner's memory figures and fit verdict for the checked config on this machine (its CUDA
  device's memory, or its RAM without one).
* :class:`Launcher` — starts ``python -m lmforge VERB --config RECIPE KEY=VALUE … run.dir=ROOT/NAME`` as a
  child process (its output in ``ROOT/.dashboard-logs/NAME.log``, beside the run dir, never inside it: the run
  dir is the pretrain command's own output), and stops one it started with SIGTERM (the trainer checkpoints
  and exits; running the same command again resumes). Processes the dashboard did not start are never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.artifacts.metadata import read_metadata
from lmforge.config import ConfigError, UserError, recipe_names, to_dict
from lmforge.dashboard.runs import flatten
from lmforge.models.presets import model_config_from_dict
from lmforge.planner.estimate import PlanRequest, estimate
from lmforge.train.config import load_config

VERBS = ("pretrain", "finetune")
CHECK_TIMEOUT_S = 300
# finetune.mode -> the planner's mode (classify and GRPO train every weight, as full fine-tuning does)
PLAN_MODES = {"sft": "full", "lora": "lora", "classify": "full", "dpo": "dpo", "reward": "reward", "grpo": "full"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KEY_RE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")
LOG_DIR = ".dashboard-logs"
MAX_OVERRIDES = 200


def recipes() -> list[str]:
    return [r for r in recipe_names() if r.split("/")[0] in VERBS]


def cli_check(verb: str, recipe: str, args: list[str]) -> dict[str, Any]:
    """The resolved config of ``lmforge VERB --config RECIPE ARGS --check --json``, or its one-line error as a
    ConfigError (the CLI's own message, ``error: `` dropped)."""
    cmd = [sys.executable, "-m", "lmforge", verb, "--config", recipe, *args, "--check", "--json"]
    try:
        out = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=CHECK_TIMEOUT_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        raise UserError(f"`lmforge {verb} --check` took over {CHECK_TIMEOUT_S} s; check the config on the CLI") from None
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        msg = next((ln for ln in reversed(lines) if ln.startswith("error: ")), lines[-1] if lines else "")
        raise ConfigError(msg.removeprefix("error: ")[:2000] or f"lmforge {verb} --check exited {out.returncode}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])["config"]
    except (ValueError, IndexError, KeyError, TypeError):
        raise UserError(f"`lmforge {verb} --check --json` printed no config; run it on the CLI to see why") from None


def _type(v: Any) -> str:
    return ("bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float" if isinstance(v, float)
            else "str" if isinstance(v, str) else "null" if v is None else "list" if isinstance(v, list) else "dict")


def fields(recipe: str) -> list[dict[str, Any]]:
    """[{"key", "value", "type"}] of the recipe's whole config, in the dataclasses' order."""
    if recipe not in recipes():
        raise UserError(f"unknown recipe '{recipe[:100]}'; pick one of {', '.join(recipes())}")
    if recipe.startswith("pretrain/"):
        config = to_dict(load_config(recipe, ["run.dir=RUN"]))
    else:
        config = cli_check("finetune", recipe, ["run.dir=RUN"])
    return [{"key": k, "value": v, "type": _type(v)} for k, v in flatten(config).items()
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


def check(body: dict[str, Any], root: Path) -> tuple[str, str, list[str], Path, dict[str, Any]]:
    """(verb, recipe, overrides, run dir, resolved config) of a launch request, or a one-line UserError /
    ConfigError (the CLI's own message)."""
    verb = body.get("verb", "pretrain")
    if verb not in VERBS:
        raise UserError(f"verb '{str(verb)[:50]}' cannot be launched here; pick one of {', '.join(VERBS)}")
    recipe = body.get("recipe")
    if recipe not in recipes() or not recipe.startswith(verb + "/"):
        raise UserError(f"unknown recipe '{str(recipe)[:100]}' for {verb}; pick one of "
                        f"{', '.join(r for r in recipes() if r.startswith(verb + '/'))}")
    name = body.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"run name '{str(name)[:100]}' must be letters, digits, '.', '_' or '-' (at most 100), "
                        "not starting with '.' or '-'")
    run_dir = root / name
    if run_dir.exists():
        raise UserError(f"{run_dir} exists; pick another run name (or resume it with the same command on the CLI)")
    overrides = overrides_of(body)
    config = cli_check(verb, recipe, [*overrides, f"run.dir={run_dir}"])  # ConfigError: the CLI's own message
    return verb, recipe, overrides, run_dir, config


def machine_memory() -> dict[str, Any]:
    """This machine without a CUDA device: its RAM (the CLI passes the CUDA device's memory where there is one)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return {"device": "cpu", "name": "CPU RAM", "memory_gb": round(total / 1e9, 2)}


def plan(body: dict[str, Any], root: Path, machine: dict[str, Any]) -> dict[str, Any]:
    """The planner's memory figures and fit verdict for a launch request on ``machine``."""
    verb, recipe, _, _, config = check(body, root)
    train, data = config.get("train") or {}, config.get("data") or {}
    if verb == "pretrain":
        model_dict = config.get("model") or {}
        mode, name = "pretrain", str(model_dict.get("preset") or "custom")
        par = config.get("parallel") or {}
        ac = par.get("activation_checkpoint") or "none"
    else:
        model_source = config.get("model") or {}
        source = str(model_source.get("from") or model_source.get("path") or "")
        try:
            model_dict = read_metadata(Path(source)).model
        except UserError as e:
            raise UserError(f"cannot plan: model.from {e}") from None
        ft = config.get("finetune") or {}
        mode, name, ac = PLAN_MODES.get(ft.get("mode"), "full"), Path(source).name or "model", "none"
    model = model_config_from_dict(model_dict)
    precision = train.get("precision")
    if precision not in ("bf16", "fp32"):
        precision = "bf16" if machine["device"] == "cuda" else "fp32"  # what train.precision=auto picks
    optimizer = (config.get("optim") or {}).get("name") or "adamw"
    lora = config.get("lora") or {}
    req = PlanRequest(model=model, model_name=name, gpus=1, gpu=machine["name"], gpu_mem_gb=machine["memory_gb"],
                      peak_tflops=1.0, seq_len=data.get("seq_len") or None, micro_batch=int(train.get("micro_batch") or 1),
                      ac=ac if isinstance(ac, str) else "none", precision=precision,
                      optimizer=optimizer if optimizer in ("adamw", "adamw8bit", "muon") else "adamw",
                      device=machine["device"], mode=mode, lora_rank=int(lora.get("rank") or 8))
    try:
        p = estimate(req)
    except ConfigError as e:
        raise ConfigError(f"cannot plan this config: {e}") from None
    m = p["memory_gb"]
    verdict = "fits" if p["fits"] else "does NOT fit"
    text = (f"{name} {mode}, seq {p['seq_len']} x micro batch {p['micro_batch']}, {precision}: weights "
            f"{m['weights']:.2f} + grads {m['grads']:.2f} + optimizer {m['optimizer']:.2f} + activations "
            f"{m['activations']:.2f} + buffers {m['buffers']:.2f} = {m['total']:.2f} GB of {machine['name']} "
            f"{machine['memory_gb']:g} GB -> {verdict}")
    return {"verb": verb, "recipe": recipe, "machine": machine, "mode": mode, "params": p["params"],
            "memory_gb": m, "fits": p["fits"], "headroom_gb": p["headroom_gb"], "verdict": text}


class Launcher:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[Path, subprocess.Popen] = {}

    def launch(self, body: dict[str, Any]) -> dict[str, Any]:
        verb, recipe, overrides, run_dir, _ = check(body, self.root)
        logs = self.root / LOG_DIR
        logs.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "lmforge", verb, "--config", recipe, *overrides, f"run.dir={run_dir}"]
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


__all__ = ["ConfigError", "Launcher", "check", "fields", "machine_memory", "plan", "recipes"]
