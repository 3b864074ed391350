"""The training loop shared by every recipe: pretraining, fine-tuning, classification.

A recipe supplies the model, a batch source and a loss; the Trainer does the rest: gradient
accumulation, AdamW + schedule, clipping, non-finite skipping, evaluation and early stopping,
metrics, DCP checkpoints with exact resume, and the consolidated model dir at the end.

    Trainer(cfg, model, train_batches, val_batches, loss_fn, total_steps=..., ...).fit()

``train_batches`` has ``next_batch()`` (this rank's share of one optimizer step: a tensor or a dict
of tensors with the batch on dim 0), ``state_dict()`` and ``load_state_dict()``. ``val_batches()``
returns an iterable of batches. ``loss_fn(model, batch) -> (loss_sum, n_tokens)``: the summed loss
and how many targets it covers; the Trainer normalizes by the global count, so micro-batches and
ranks with different numbers of real tokens weigh correctly.

Optional hooks for fine-tuning recipes: ``eval_fn(model) -> {metric: value}`` adds metrics to every
evaluation (e.g. dev accuracy; every rank calls it); early stopping follows ``cfg.eval.metric``
(default ``val_loss``) in the direction ``cfg.eval.metric_mode`` (``min`` | ``max``); ``on_best(trainer)``
runs on every rank whenever an evaluation sets a new best (a recipe keeps the best weights there).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ConfigError, UserError, config_hash, dump_yaml
from lmforge.console import info
from lmforge.train import checkpoint as ckpt
from lmforge.train.metrics import MetricsWriter, Progress, format_duration, memory_stats, peak_flops
from lmforge.train.optim import build_optimizer, set_lr
from lmforge.train.parallel import World, all_reduce_sum, barrier, no_sync, parallelize_model, unwrap
from lmforge.train.schedule import LRSchedule
from lmforge.train.trackers import build_trackers


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last good state was checkpointed."""


def causal_lm_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed. batch: tokens (B, T+1), or a dict with ``tokens`` and optional
    ``mask`` (bool (B, 1, T, T)), ``positions`` (B, T) and ``labels`` (B, T+1; -100 = not a target)."""
    mask = positions = labels = None
    if isinstance(batch, dict):
        tokens, mask, positions, labels = batch["tokens"], batch.get("mask"), batch.get("positions"), batch.get("labels")
    else:
        tokens = batch
    inputs = tokens[:, :-1]  # (B, T)
    targets = (labels if labels is not None else tokens)[:, 1:]  # (B, T)
    logits = model(inputs, positions=positions, mask=mask)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=-100)
    return loss, (targets != -100).sum()


def split_micro(batch: Any, micro: int) -> list[Any]:
    """Cut a step's batch into micro-batches of ``micro`` rows (tensors or dicts of tensors)."""
    if isinstance(batch, dict):
        n = next(iter(v for v in batch.values() if torch.is_tensor(v))).size(0)
        return [{k: (v[i:i + micro] if torch.is_tensor(v) and v.dim() and v.size(0) == n else v)
                 for k, v in batch.items()} for i in range(0, n, micro)]
    return list(batch.split(micro, dim=0))


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# ---- resume ------------------------------------------------------------------------------------
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


@dataclass
class TrainResult:
    step: int
    tokens: int
    stop_reason: str  # max_steps | early_stop | time_limit | signal
    final_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    best_val_loss: float | None = None
    best_metric: str = "val_loss"  # what early stopping / best tracking followed
    best_value: float | None = None
    best_step: int | None = None
    resumed_from: str | None = None
    elapsed_s: float = 0.0
    tok_per_s: float | None = None
    mfu: float | None = None
    nonfinite_total: int = 0
    model_dir: str | None = None
    run_dir: str = ""
    peak_flops_source: str | None = None


class Trainer:
    """Runs ``total_steps`` optimizer steps of ``loss_fn`` on ``model`` (see the module docstring)."""

    def __init__(self, cfg, model: nn.Module, train_batches, val_batches: Callable[[], Iterable[Any]] | None = None,
                 loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]] = causal_lm_loss, *,
                 total_steps: int, world: World | None = None, device: torch.device | str = "cpu",
                 config_dict: dict[str, Any] | None = None, math_fields: dict[str, Any] | None = None,
                 flops_per_token: float | None = None, bytes_per_token: float | None = None,
                 save_model: Callable[[nn.Module, Path], Any] | None = None, resume_from: Path | None | str = "find",
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 on_best: Callable[[Trainer], Any] | None = None, finish_tracking: bool = True):
        self.cfg = cfg
        self.world = world or World()
        self.device = torch.device(device)
        self.run_dir = Path(cfg.run.dir)
        self.total_steps = total_steps
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.on_best = on_best
        self.best_metric = getattr(cfg.eval, "metric", None) or "val_loss"
        self.maximize = getattr(cfg.eval, "metric_mode", "min") == "max"
        self.config_dict = config_dict if config_dict is not None else _to_dict(cfg)
        self.math_fields = dict(math_fields or {})
        self.flops_per_token = flops_per_token
        self.bytes_per_token = bytes_per_token
        self.save_model_fn = save_model
        self.resume_from = (find_resume(self.run_dir, cfg.train.resume) if resume_from == "find"
                            else (Path(resume_from) if resume_from else None))
        self.resume_notes: list[str] = []
        if self.resume_from is not None:
            self.resume_notes = check_compatible(self.resume_from, self.math_fields, cfg.checkpoint.allow_mismatch)
        self.raw_model = model
        self.model = parallelize_model(model, cfg, self.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, total_steps)
        self.ckpt = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.world.rank)
        # experiment trackers (log.mlflow / log.wandb), rank 0 only; MetricsWriter hands them every row
        self.trackers = build_trackers(cfg.log, self.run_dir, getattr(cfg.run, "name", None), self.world.is_main)
        self.finish_tracking = finish_tracking  # False: the caller exports the model, then calls finish_run
        self.metrics = MetricsWriter(self.run_dir, enabled=self.world.is_main, tensorboard=cfg.log.tensorboard,
                                     trackers=self.trackers)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        # trainer state (checkpointed)
        self.step = 0
        self.tokens = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.last_val: dict[str, float] = {}
        self.last_val_step: int | None = None
        self._stop_signal: str | None = None

    # ---- state ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "config": self.config_dict,
            "math": self.math_fields,
            "config_hash": config_hash(self.math_fields),
            "schedule": self.schedule.state_dict(),
            "trainer": {"best_val": self.best_val, "best_step": self.best_step,
                        "evals_since_best": self.evals_since_best,
                        "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                        "last_val": self.last_val, "last_val_step": self.last_val_step},
            "lmforge_version": __import__("lmforge").__version__,
        }

    def save_checkpoint(self) -> Path:
        rank_state = {"loader": self.train_batches.state_dict(), "rng": ckpt.rng_state()}
        return self.ckpt.save(self.step, self.model, self.optimizer, self._meta(), rank_state)

    def _load_checkpoint(self, path: Path) -> None:
        meta, rank_state = self.ckpt.load(path, self.model, self.optimizer)
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        t = meta.get("trainer", {})
        self.best_val = t.get("best_val")
        self.best_step = t.get("best_step")
        self.evals_since_best = int(t.get("evals_since_best", 0))
        self.nonfinite_total = int(t.get("nonfinite_total", 0))
        self.nonfinite_streak = int(t.get("nonfinite_streak", 0))
        self.last_val = t.get("last_val", {}) or {}
        self.last_val_step = t.get("last_val_step")
        if "loader" in rank_state:
            self.train_batches.load_state_dict(rank_state["loader"])
        if "rng" in rank_state:
            ckpt.set_rng_state(rank_state["rng"])
        if self.world.is_main:
            for note in self.resume_notes + _changed_settings(meta.get("config", {}), self.config_dict):
                info(f"note: resuming with changed setting {note}")

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte over ``eval.batches`` batches,
        plus whatever ``eval_fn`` measures."""
        model = self.model
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        extra: dict[str, float] = {}
        try:
            for batch in (self.val_batches() if self.val_batches is not None else ()):
                batch = to_device(batch, self.device)
                with self._autocast():
                    loss_sum, n = self.loss_fn(model, batch)
                total[0] += loss_sum.double()
                total[1] += float(n)
            if self.eval_fn is not None:
                with self._autocast():
                    extra = dict(self.eval_fn(model))
        finally:
            model.train(was_training)
        if self.val_batches is not None:
            all_reduce_sum(total)
        out: dict[str, float] = {}
        if total[1] > 0:
            loss = float(total[0] / total[1])
            out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
            if self.bytes_per_token:
                out["val_bpb"] = loss / math.log(2) / self.bytes_per_token
        out.update(extra)
        if not out:
            return {}
        out["eval_time"] = time.perf_counter() - t0
        return out

    @property
    def can_evaluate(self) -> bool:
        return (self.val_batches is not None or self.eval_fn is not None) and bool(self.cfg.eval.batches)

    def _autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- one optimizer step ----------------------------------------------------------------------
    def train_step(self, batch: Any) -> dict[str, float]:
        """Forward/backward over the micro-batches of one step, then clip and update (or skip)."""
        cfg = self.cfg
        lr = self.schedule(self.step)
        set_lr(self.optimizer, lr)
        micro = split_micro(batch, cfg.train.micro_batch)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, target tokens)
        for i, mb in enumerate(micro):
            mb = to_device(mb, self.device)
            with no_sync(self.model, skip=i < len(micro) - 1), self._autocast():
                loss_sum, n = self.loss_fn(self.model, mb)
            loss_sum.backward()
            totals[0] += loss_sum.detach().double()
            totals[1] += float(n)
        all_reduce_sum(totals)
        n_global = float(totals[1])
        loss = float(totals[0] / max(n_global, 1.0))
        params = [p for p in self.model.parameters() if p.grad is not None]
        if params and n_global > 0:
            # grads hold the sum over this rank's targets, averaged over ranks by DDP -> mean per target
            torch._foreach_div_([p.grad for p in params], n_global / self.world.dp_size)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nonfinite_streak = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += int(n_global)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite, "tokens": int(n_global)}

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.config_dict, self.run_dir / "config.yaml")
            self.trackers.start(self.config_dict, resume=self.resume_from is not None)
        self.ckpt.clean_partial()
        peak, self.peak_source = peak_flops(self.device, cfg.train.precision, cfg.log.peak_tflops)
        resumed = None
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
            resumed = str(self.resume_from)
            self.metrics.truncate_after(self.step)
            if world.is_main:
                info(f"resumed from {self.resume_from} at step {self.step} ({self.tokens:,} tokens)")
        else:
            torch.manual_seed(cfg.train.seed + world.rank)  # dropout streams differ per rank
            self.metrics.truncate_after(-1)  # a fresh run: no rows from an earlier attempt
        barrier()
        self.metrics.write({"kind": "event", "step": self.step, "event": "resume" if resumed else "start",
                            "total_steps": self.total_steps, "time": time.time()})
        progress = Progress(self.total_steps, enabled=cfg.log.progress and world.is_main, every=cfg.log.interval)
        old_handlers = self._install_signal_handlers()
        t_start = time.perf_counter()
        stop_reason = "max_steps"
        window = {"loss": 0.0, "n": 0, "skipped": 0, "tokens": 0, "time": 0.0, "steps": 0, "grad_norm": 0.0}
        last_row: dict[str, Any] = {}
        # a resumed run already holds the checkpoint (and maybe the evaluation) of its starting step
        saved_at = self.step if resumed else -1
        evaluated_at = self.last_val_step if resumed and self.last_val_step == self.step else -1
        tps_hist: list[float] = []
        ema_dt: float | None = None
        try:
            self.model.train()
            if cfg.eval.at_start and self.step == 0 and self.can_evaluate and not resumed:
                self._log_eval(self.evaluate())
                evaluated_at = 0
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                batch = self.train_batches.next_batch()
                out = self.train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                window["time"] += dt
                window["steps"] += 1
                window["tokens"] += out["tokens"]
                if out["finite"]:
                    window["loss"] += out["loss"]
                    window["grad_norm"] += out["grad_norm"]
                    window["n"] += 1
                else:
                    window["skipped"] += 1
                    if world.is_main:
                        progress.message(f"step {self.step}: non-finite loss/grad (loss {out['loss']}, grad norm "
                                         f"{out['grad_norm']}); update skipped ({self.nonfinite_streak} in a row)")
                    self.metrics.write({"kind": "event", "step": self.step, "event": "nonfinite",
                                        "loss": out["loss"], "grad_norm": out["grad_norm"]})
                if self.nonfinite_streak >= cfg.train.max_nonfinite:
                    self.save_checkpoint()
                    raise TrainingDiverged(
                        f"{self.nonfinite_streak} non-finite steps in a row at step {self.step}; the last good "
                        f"weights were checkpointed in {self.ckpt.dir}; lower optim.lr or check the data, "
                        f"then resume")
                if self.step % cfg.log.interval == 0 or self.step == self.total_steps:
                    last_row = self._log_train(out, window, peak)
                    if window["steps"]:
                        tps_hist.append(last_row["tok_per_s"])
                    window = {k: 0 if isinstance(v, int) else 0.0 for k, v in window.items()}
                ema_dt = dt if ema_dt is None else 0.9 * ema_dt + 0.1 * dt
                progress.update(self.step, out["loss"], out["lr"], out["tokens"] / ema_dt, ema_dt)
                stop = None
                if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.can_evaluate:
                    val = self._log_eval(self.evaluate())
                    evaluated_at = self.step
                    if val and self._early_stop(val):
                        stop = "early_stop"
                if cfg.train.time_limit_minutes and time.perf_counter() - t_start > cfg.train.time_limit_minutes * 60:
                    stop = stop or "time_limit"
                if self._stop_signal:
                    stop = stop or "signal"
                if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or \
                        (stop and self.step < self.total_steps):
                    self.save_checkpoint()
                    saved_at = self.step
                if stop:
                    stop_reason = stop
                    if world.is_main:
                        progress.message(f"stopping at step {self.step}: {stop.replace('_', ' ')}")
                    break
            progress.close()
            if self.can_evaluate and evaluated_at != self.step:
                val = self._log_eval(self.evaluate())
                if val:
                    self._early_stop(val)  # the last evaluation counts for the best (no stop decision left)
            if cfg.checkpoint.at_end and saved_at != self.step and self.step > 0:
                self.save_checkpoint()
        finally:
            progress.close()
            self._restore_signal_handlers(old_handlers)
        elapsed = time.perf_counter() - t_start
        self.metrics.write({"kind": "event", "step": self.step, "event": "end", "reason": stop_reason,
                            "elapsed_s": elapsed, "time": time.time()})
        self.metrics.close()
        model_dir = None
        if cfg.checkpoint.save_model:
            model_dir = self.export_model()
        if self.finish_tracking:
            self.trackers.finish_run(stop_reason, model_dir)  # report.png, config, metrics, model dir; close
        tps = sorted(tps_hist)[len(tps_hist) // 2] if tps_hist else None
        return TrainResult(
            step=self.step, tokens=self.tokens, stop_reason=stop_reason, final_loss=last_row.get("loss"),
            val=dict(self.last_val), best_val_loss=self.best_val if self.best_metric == "val_loss" else None,
            best_metric=self.best_metric, best_value=self.best_val, best_step=self.best_step,
            resumed_from=resumed, elapsed_s=elapsed,
            tok_per_s=tps, mfu=(tps * self.flops_per_token / (peak * world.world_size)
                                if tps and self.flops_per_token else None),
            nonfinite_total=self.nonfinite_total, model_dir=str(model_dir) if model_dir else None,
            run_dir=str(self.run_dir), peak_flops_source=self.peak_source)

    def export_model(self) -> Path | None:
        """Consolidate the weights (gathered from all ranks) into RUN/model on rank 0."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out = self.run_dir / "model"
        if self.world.is_main:
            raw = unwrap(self.raw_model)
            with torch.device("meta"):
                shell = type(raw)(raw.cfg)
            unexpected = shell.load_state_dict(sd, assign=True, strict=False).unexpected_keys
            shell.tie_weights()
            shell.extra_state_dict = {k: sd[k] for k in unexpected}  # injected heads' weights (model.mlm, …)
            if self.save_model_fn is not None:
                self.save_model_fn(shell, out)
            else:
                from lmforge.models.model_dir import save_model_dir

                save_model_dir(shell, out)
        barrier()
        return out

    # ---- helpers ---------------------------------------------------------------------------------
    def _log_train(self, out: dict, window: dict, peak: float) -> dict[str, Any]:
        n = max(1, window["n"])
        tok_per_s = window["tokens"] / window["time"] if window["time"] else 0.0
        row = {"kind": "train", "step": self.step, "tokens": self.tokens,
               "loss": window["loss"] / n if window["n"] else out["loss"], "lr": out["lr"],
               "grad_norm": window["grad_norm"] / n if window["n"] else out["grad_norm"],
               "tok_per_s": tok_per_s,
               "mfu": (tok_per_s * self.flops_per_token / (peak * self.world.world_size)
                       if self.flops_per_token else None),
               "step_time": window["time"] / max(1, window["steps"]),
               **memory_stats(self.device)}
        if window["skipped"] or self.nonfinite_total:
            row.update(skipped=window["skipped"], nonfinite_total=self.nonfinite_total)
        self.metrics.write(row)
        return row

    def _log_eval(self, val: dict[str, float]) -> dict[str, float]:
        if not val:
            return val
        self.last_val = {k: v for k, v in val.items() if k != "eval_time"}
        self.last_val_step = self.step
        self.metrics.write({"kind": "eval", "step": self.step, "tokens": self.tokens, **val})
        if self.world.is_main:
            parts = []
            if "val_loss" in val:
                bpb = f", {val['val_bpb']:.3f} bits/byte" if "val_bpb" in val else ""
                ppl = f", ppl {val['val_ppl']:.2f}" if "val_ppl" in val else ""
                parts.append(f"val loss {val['val_loss']:.4f}{ppl}{bpb}")
            parts += [f"{k} {v:.4g}" for k, v in val.items()
                      if k not in ("val_loss", "val_ppl", "val_bpb", "eval_time") and isinstance(v, (int, float))]
            info(f"step {self.step}: " + ", ".join(parts))
        return val

    def _early_stop(self, val: dict[str, float]) -> bool:
        """Track the best ``eval.metric``; True when ``eval.patience`` evaluations passed without a better one."""
        if self.best_metric not in val:
            raise ConfigError(f"eval.metric={self.best_metric} is not among the evaluation's metrics "
                              f"({', '.join(k for k in val if k != 'eval_time')}); pick one of those")
        value, delta = float(val[self.best_metric]), self.cfg.eval.min_delta
        better = self.best_val is None or (value > self.best_val + delta if self.maximize
                                           else value < self.best_val - delta)
        if better:
            self.best_val, self.best_step = value, self.step
            self.evals_since_best = 0
            if self.on_best is not None:
                self.on_best(self)
            return False
        self.evals_since_best += 1
        return bool(self.cfg.eval.patience) and self.evals_since_best >= self.cfg.eval.patience

    def _install_signal_handlers(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass
        return old

    def _restore_signal_handlers(self, old) -> None:
        for sig, h in (old or {}).items():
            try:
                signal.signal(sig, h)
            except (ValueError, OSError):
                pass


def _to_dict(cfg) -> dict[str, Any]:
    from lmforge.config import to_dict

    return to_dict(cfg)


__all__ = [
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "causal_lm_loss",
    "check_compatible",
    "find_resume",
    "format_duration",
    "split_micro",
]
