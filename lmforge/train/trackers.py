"""Experiment trackers beside metrics.jsonl: MLflow (``log.mlflow``) and Weights & Biases (``log.wandb``).

A ``Tracker`` has four calls: ``start(config)``, ``log(row)`` (every metrics.jsonl row), ``artifacts(paths)`` and
``finish(status)``. Tracking never stops training: the first failure of a tracker prints one warning line and
switches that tracker off for the rest of the run. Only rank 0 tracks (``build_trackers(..., enabled=is_main)``).
The packages are optional extras (``pip install 'lmforge[mlflow]'`` / ``'lmforge[wandb]'``) imported only when a
tracker is configured. This module imports no torch; the config dataclasses live here so the config stays small.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lmforge.atomic import atomic_write_text
from lmforge.config import ConfigError
from lmforge.train.report import plot

STATUSES = ("finished", "failed", "killed")
IDS_FILE = "trackers.json"  # RUN/trackers.json: the tracking runs' ids, so a resumed run logs to the same one


# ---- config (the `log.mlflow` and `log.wandb` sections) -------------------------------------------------------
@dataclass
class MLflowLogConfig:
    tracking_uri: str | None = None  # http(s)://host:port, file:, sqlite:///…; default $MLFLOW_TRACKING_URI/MLflow's
    experiment: str = "lmforge"  # created when missing
    run_name: str | None = None  # default run.name
    tags: dict[str, Any] = field(default_factory=dict)  # run tags {key: value}
    log_model: bool = True  # upload RUN/model as artifacts at the end (a 7B model dir is ~14 GB)


@dataclass
class WandbLogConfig:
    project: str = "lmforge"
    entity: str | None = None  # team or user; default the logged-in user's
    name: str | None = None  # run name; default run.name
    tags: list[str] = field(default_factory=list)
    mode: Literal["online", "offline", "disabled"] | None = None  # default $WANDB_MODE, else online
    dir: str | None = None  # where wandb writes its files; default $WANDB_DIR, else the run dir
    log_model: bool = True  # log RUN/model as a `model` artifact at the end


_WANDB_PROJECT_FORBIDDEN = set("/\\#?%:")
_WANDB_FORBIDDEN_TEXT = " ".join(sorted(_WANDB_PROJECT_FORBIDDEN))


def validate_tracker_config(mlflow: MLflowLogConfig | None, wandb: WandbLogConfig | None) -> None:
    """Value checks of ``log.mlflow`` / ``log.wandb`` (types were checked when the config was read)."""
    import importlib.util

    if mlflow is not None:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError("log.mlflow needs the mlflow package: pip install 'lmforge[mlflow]' "
                              "(or remove log.mlflow)")
        if not mlflow.experiment.strip():
            raise ConfigError("log.mlflow.experiment is empty; name an experiment, e.g. log.mlflow.experiment=lmforge")
        uri = mlflow.tracking_uri
        if uri is not None:
            if not uri.strip():
                raise ConfigError("log.mlflow.tracking_uri is empty; give a server URL such as "
                                  "http://127.0.0.1:5000, or remove the key for MLflow's default")
            parts = urlsplit(uri)
            if parts.scheme in ("http", "https"):
                try:
                    port = parts.port
                except ValueError:
                    port = -1
                if not parts.hostname or port == -1:
                    raise ConfigError(f"log.mlflow.tracking_uri='{uri}' is not a valid server URL; "
                                      "write it as http://HOST:PORT")
        for key, value in mlflow.tags.items():
            if isinstance(value, (dict, list)):
                raise ConfigError(f"log.mlflow.tags.{key} must be a single value (text or number), got {value!r}")
    if wandb is not None:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("log.wandb needs the wandb package: pip install 'lmforge[wandb]' (or remove log.wandb)")
        bad = " ".join(sorted(_WANDB_PROJECT_FORBIDDEN & set(wandb.project)))
        if not wandb.project.strip() or bad:
            raise ConfigError(f"log.wandb.project='{wandb.project}' must be a non-empty name without "
                              f"{bad or _WANDB_FORBIDDEN_TEXT}; e.g. log.wandb.project=lmforge")
        for tag in wandb.tags:
            if not 1 <= len(tag) <= 64:
                raise ConfigError(f"log.wandb.tags: '{tag}' must be 1 to 64 characters long (a W&B limit)")


# ---- the interface ---------------------------------------------------------------------------------------
class Tracker:
    """One tracking backend. Subclasses implement ``_start``/``_log``/``_artifacts``/``_finish``; the public
    methods here turn the first exception into one warning line and switch the tracker off."""

    name = "tracker"  # the config key, for messages: log.<name>
    label = "it"  # the product's name, for messages

    def __init__(self) -> None:
        self.active = True
        self.run_id: str | None = None

    def start(self, config: dict[str, Any], resume_id: str | None = None) -> None:
        """Open (or, with ``resume_id``, reopen) the tracking run and record the resolved config."""
        self._guard("start", self._start, config, resume_id)

    def log(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row: numeric fields become metrics named ``<kind>/<field>`` at ``row['step']``."""
        if row.get("kind") == "event":
            if row.get("event") == "spike":  # train.spike: its figures at the step that spiked
                self._guard("log", self._log, *spike_metrics(row))
            return  # start/resume/end events are not curves (the end's reason becomes the run's status)
        step, values = int(row.get("step", 0)), numeric_fields(row)
        if values:
            self._guard("log", self._log, step, values)

    def artifacts(self, paths: Iterable[str | Path]) -> None:
        """Upload files and directories (a directory keeps its name as the artifact folder)."""
        existing = [Path(p) for p in paths if p is not None and Path(p).exists()]
        if existing:
            self._guard("artifacts", self._artifacts, existing)

    def finish(self, status: str = "finished") -> None:
        """Close the tracking run with ``status`` (finished | failed | killed)."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {STATUSES}")
        self._guard("finish", self._finish, status)
        self.active = False

    def _guard(self, what: str, fn, *args) -> None:
        if not self.active:
            return
        try:
            with contextlib.redirect_stdout(sys.stderr):  # a tracker's own notes (run links) stay off stdout,
                fn(*args)  # which `--json` keeps to one object
        except Exception as e:  # noqa: BLE001 - any failure of a tracker must not stop training
            self.active = False
            detail = " ".join(str(e).split())[:300] or type(e).__name__
            print(f"warning: log.{self.name}: {what} failed ({detail}); training continues without {self.label}",
                  file=sys.stderr, flush=True)

    # subclasses
    def _start(self, config: dict[str, Any], resume_id: str | None) -> None:
        raise NotImplementedError

    def _log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def _artifacts(self, paths: list[Path]) -> None:
        raise NotImplementedError

    def _finish(self, status: str) -> None:
        raise NotImplementedError


def numeric_fields(row: dict[str, Any]) -> dict[str, float]:
    """``{"<kind>/<field>": value}`` for the finite numbers of a row (the names TensorBoard uses too)."""
    kind = row.get("kind", "train")
    out = {}
    for key, value in row.items():
        if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


def spike_metrics(row: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A ``spike`` event row -> (the spiked step, ``{"spike/loss": …, "spike/threshold": …, "spike/<action>": 1}``);
    a rollback adds ``spike/to_step``, the checkpoint's step the run went back to (the row's ``step``)."""
    values = {f"spike/{k}": float(v) for k, v in row.items()
              if k not in ("step", "spike_step", "kind") and not isinstance(v, bool) and isinstance(v, (int, float))
              and math.isfinite(v)}
    action = str(row.get("action", "spike"))
    values[f"spike/{action}"] = 1.0
    if action == "rollback":
        values["spike/to_step"] = float(row.get("step", 0))
    return int(row.get("spike_step", row.get("step", 0))), values


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.max_steps": "300", ...}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
    return out


# ---- MLflow ----------------------------------------------------------------------------------------------
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
MLFLOW_PARAM_MAX = 6000  # MLflow's limit on a param value's length
MLFLOW_BATCH = 100  # params per log_batch call (MLflow accepts at most 100)


class MLflowTracker(Tracker):
    name, label = "mlflow", "MLflow"

    def __init__(self, cfg: MLflowLogConfig, run_name: str | None) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_name = cfg.run_name or run_name
        self.client = None

    def _start(self, config: dict[str, Any], resume_id: str | None) -> None:
        uri = self.cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri and urlsplit(uri).scheme in ("http", "https"):
            _check_reachable(uri)
            # MLflow's HTTP defaults retry for minutes; a tracker must not stall training that long
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(self.cfg.experiment)
        run = self._run_to_resume(resume_id, exp_id) if resume_id is not None else None
        known: dict[str, str] = {}
        if run is not None:
            self.client.update_run(resume_id, status="RUNNING")
            self.run_id, known = resume_id, dict(run.data.params)
        else:
            tags = {str(k): str(v) for k, v in self.cfg.tags.items()}
            self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        params = [Param(k, _cut(v, MLFLOW_PARAM_MAX)) for k, v in flatten(config).items() if k not in known]
        for i in range(0, len(params), MLFLOW_BATCH):  # a resumed run keeps its first values (MLflow's rule)
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])

    def _run_to_resume(self, run_id: str, exp_id: str):
        """The earlier segment's run, or None when it is gone or in another experiment (then a new run)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return run if run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active" else None

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def _artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_dir():
                if path.name == "model" and not self.cfg.log_model:
                    continue
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def _finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (one TCP connect) when nothing listens at the server URL. Behind an HTTP proxy the client
    goes through the proxy, so a direct connect proves nothing: no probe then."""
    import urllib.request

    parts = urlsplit(uri)
    if not parts.hostname:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach the tracking server at {uri}: {e.strerror or e}") from None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ---- Weights & Biases ------------------------------------------------------------------------------------
WANDB_EXIT_CODE = {"finished": 0, "failed": 1, "killed": 143}


class WandbTracker(Tracker):
    name, label = "wandb", "W&B"

    def __init__(self, cfg: WandbLogConfig, run_name: str | None, run_dir: Path) -> None:
        super().__init__()
        self.cfg = cfg
        self.run_name = cfg.name or run_name
        self.run_dir = Path(run_dir)
        self.run = None

    def _start(self, config: dict[str, Any], resume_id: str | None) -> None:
        import wandb

        if self.cfg.mode not in ("offline", "disabled"):
            settings = wandb.setup().settings  # the resolved mode and server ($WANDB_*, `wandb login --host`)
            if (self.cfg.mode or settings.mode) in ("online", "run"):
                _check_reachable(settings.base_url)  # else wandb.init retries for its 90 s init timeout
        directory = self.cfg.dir or (None if os.environ.get("WANDB_DIR") else str(self.run_dir))
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, name=self.run_name, tags=list(self.cfg.tags),
            mode=self.cfg.mode, dir=directory, config=config, id=resume_id,
            resume="allow" if resume_id else None,
            settings=wandb.Settings(console="off"),  # leave stdout alone: `--json` prints one object there
        )
        self.run_id = self.run.id

    def _log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def _artifacts(self, paths: list[Path]) -> None:
        import wandb

        for path in paths:
            if path.is_dir():
                if path.name == "model" and not self.cfg.log_model:
                    continue
                art = wandb.Artifact(f"{path.name}-{self.run.id}", type="model" if path.name == "model" else "dir")
                art.add_dir(str(path))
                self.run.log_artifact(art)
            else:
                self.run.save(str(path), base_path=str(path.parent), policy="now")

    def _finish(self, status: str) -> None:
        self.run.finish(exit_code=WANDB_EXIT_CODE[status])


# ---- the group the trainer holds ---------------------------------------------------------------------------
class Trackers:
    """The configured trackers of one run, driven together. Empty (every call a no-op) when none is configured
    or on ranks other than 0. A run that exits without ``finish`` is closed as failed at interpreter exit."""

    def __init__(self, trackers: list[Tracker], run_dir: str | Path) -> None:
        self.trackers = trackers
        self.run_dir = Path(run_dir)
        self._open = False

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, config: dict[str, Any], resume: bool = False) -> None:
        """Open every tracker's run; with ``resume`` reopen the runs named in RUN/trackers.json."""
        if not self.trackers:
            return
        ids = _read_ids(self.run_dir) if resume else {}
        for t in self.trackers:
            t.start(config, ids.get(t.name))
        self._write_ids({t.name: t.run_id for t in self.trackers if t.active and t.run_id})
        self._open = True
        atexit.register(self._close_on_exit)

    def log(self, row: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log(row)

    def artifacts(self, paths: Iterable[str | Path]) -> None:
        paths = list(paths)
        for t in self.trackers:
            t.artifacts(paths)

    def finish(self, status: str = "finished") -> None:
        if not self._open:
            return
        self._open = False
        atexit.unregister(self._close_on_exit)
        for t in self.trackers:
            t.finish(status)

    def finish_run(self, stop_reason: str, *dirs: str | Path | None) -> None:
        """The end of a run: draw RUN/report.png, upload config.yaml, metrics.jsonl, the PNG and ``dirs`` (the
        model dir; a fine-tune's adapter dir), then close as ``killed`` after a signal stop, else ``finished``."""
        if not self._open:
            return
        paths = [self.run_dir / "config.yaml", self.run_dir / "metrics.jsonl", self._report()]
        self.artifacts(paths + [Path(d) for d in dirs if d])
        self.finish("killed" if stop_reason == "signal" else "finished")

    def _report(self) -> Path | None:
        try:
            return plot(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a report that cannot be drawn must not fail the run
            print(f"warning: could not draw {self.run_dir / 'report.png'} for the trackers ({e}); "
                  "uploading the rest", file=sys.stderr, flush=True)
            return None

    def _close_on_exit(self) -> None:
        self.finish("failed")

    def _write_ids(self, ids: dict[str, str]) -> None:
        if not ids:
            return
        try:
            atomic_write_text(self.run_dir / IDS_FILE, json.dumps(ids, indent=1) + "\n")
        except OSError as e:
            print(f"warning: could not write {self.run_dir / IDS_FILE} ({e}); a resumed run will open new "
                  "tracking runs", file=sys.stderr, flush=True)


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(ids, dict) else {}


def build_trackers(log_cfg: Any, run_dir: str | Path, run_name: str | None = None, enabled: bool = True) -> Trackers:
    """The trackers ``log.mlflow`` / ``log.wandb`` name (none when ``enabled`` is false: ranks other than 0)."""
    trackers: list[Tracker] = []
    if enabled:
        if getattr(log_cfg, "mlflow", None) is not None:
            trackers.append(MLflowTracker(log_cfg.mlflow, run_name))
        if getattr(log_cfg, "wandb", None) is not None:
            trackers.append(WandbTracker(log_cfg.wandb, run_name, Path(run_dir)))
    return Trackers(trackers, run_dir)


__all__ = [
    "MLflowLogConfig",
    "MLflowTracker",
    "Tracker",
    "Trackers",
    "WandbLogConfig",
    "WandbTracker",
    "build_trackers",
    "flatten",
    "numeric_fields",
    "spike_metrics",
    "validate_tracker_config",
]
