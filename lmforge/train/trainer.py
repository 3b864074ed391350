"""The training loop shared by every recipe: pretraining, fine-tuning, classification.

A task (`lmforge.tasks`) supplies a `Job`: the model, a batch source, a loss, its evaluation and the
settings that change its math; the Trainer does the rest: gradient accumulation, AdamW + schedule,
clipping, non-finite skipping, evaluation and early stopping, metrics, DCP checkpoints with exact resume,
and the consolidated model dir at the end.

    Trainer(cfg, Job(model, batches, total_steps, loss, val_batches, ...), world, resume_from=...).fit()

``batches`` has ``next_batch()`` (this rank's share of one optimizer step: a tensor or a dict
of tensors with the batch on dim 0), ``state_dict()`` and ``load_state_dict()``. ``val_batches()``
returns the WHOLE evaluation set, the same on every rank; the Trainer gives each data-parallel rank its
share with the same number of forward passes (see `Trainer.evaluate`). ``loss(model, batch) ->
(loss_sum, n_tokens)``: the summed loss and how many targets it covers; the Trainer normalizes by the
global count, so micro-batches and ranks with different numbers of real tokens weigh correctly.

Optional hooks for fine-tuning tasks: ``eval_fn(model) -> {metric: value}`` adds metrics to every
evaluation (e.g. dev accuracy; every rank calls it); early stopping follows ``cfg.eval.metric``
(default ``val_loss``) in the direction ``cfg.eval.metric_mode`` (``min`` | ``max``); ``on_best(trainer)``
runs on every rank whenever an evaluation sets a new best (a task keeps the best weights there).

Across ranks: every decision that leads to collectives (evaluate, checkpoint, stop) is the same on all
ranks at the same step: evaluation and checkpoint cadence follow the step count, and the stop flags
(signal, time limit, early stop, divergence) are agreed by an all-reduce (`lmforge.train.stopping`), and so
is the verdict on a loss spike (``train.spike``, `lmforge.train.spike`): skip the update, roll back to the last
verified checkpoint (skipping the data consumed since), or stop.
Dropout streams are seeded per data-parallel rank (TP peers share one); notes print on rank 0 only.

Accounting: ``tokens`` / ``tok_per_s`` / MFU count the input tokens that went through forward passes
(padding excluded); ``loss_tokens`` counts the targets of the loss (assistant tokens for SFT, the
masked ~15% for MLM, examples for classification).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge import __version__
from lmforge.artifacts.consolidate import consolidate
from lmforge.artifacts.model_dir import save_model_dir
from lmforge.config import ConfigError, UserError, config_hash, dump_yaml, to_dict
from lmforge.console import info
from lmforge.data.mixture import DataExhausted
from lmforge.distributed.world import World, barrier, no_sync, parallelize_model, unwrap
from lmforge.train import checkpoint as ckpt
from lmforge.train.batches import count_input_tokens, input_tokens, split_micro, to_device
from lmforge.train.config import resolve_precision
from lmforge.train.losses import causal_lm_loss
from lmforge.train.metrics import (
    MetricsWriter,
    Progress,
    ThroughputMeter,
    format_duration,
    memory_stats,
    peak_flops,
)
from lmforge.train.optim import build_optimizer, set_lr
from lmforge.train.resume import _changed_settings, check_compatible, find_resume
from lmforge.train.schedule import LRSchedule
from lmforge.train.spike import SpikeDetector, Verdict
from lmforge.train.stopping import StopSignals, agree, exit_code
from lmforge.train.trackers import build_trackers


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the message names the last checkpoint of finite weights."""


class LossSpikeStop(UserError):
    """A loss spike stopped the run (``train.spike.action=stop``, or one spike more than
    ``train.spike.max_rollbacks``); the message names the checkpoint of the weights from before it."""


def now() -> float:
    """The clock of ``train.time_limit_minutes`` (a seam: tests skew one rank's clock)."""
    return time.perf_counter()


def seed_rank_stream(seed: int, step: int, dp_rank: int) -> None:
    """Seed torch's global generators (dropout) from (seed, step, data-parallel rank): TP peers, which hold
    the same replicated activations, draw the same masks; data-parallel ranks draw different ones; a
    resume on another world size derives every rank's stream afresh instead of copying rank 0's."""
    digest = hashlib.blake2b(f"lmforge-rng/{seed}/{step}/{dp_rank}".encode(), digest_size=8).digest()
    torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _same_on_every_rank(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's evaluation metrics on every rank: early stopping and ``on_best`` (which runs collectives)
    then decide alike even if an ``eval_fn`` rounded differently on some rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    box = [metrics]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class TrainResult:
    step: int
    tokens: int  # input tokens processed (forward passes), all ranks
    stop_reason: str  # max_steps | early_stop | time_limit | signal | data_exhausted
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
    loss_tokens: int = 0  # targets the loss covered, all ranks
    signal: str | None = None  # SIGINT | SIGTERM | SIGUSR1 when stop_reason == "signal"
    exit_code: int = 0  # what the CLI exits with: 0 finished, 128+signal, 124 time limit
    checkpoint: str | None = None  # the newest checkpoint of this run (None: none written)
    rollbacks: int = 0  # loss-spike rollbacks over the whole run (train.spike.action=rollback)


@dataclass
class Job:
    """What a task hands the Trainer for one run (`lmforge.tasks` builds it; tests build it by hand).

    ``batches`` has ``next_batch()`` / ``state_dict()`` / ``load_state_dict()``; ``val_batches()`` returns the
    whole evaluation set; ``loss(model, batch) -> (loss_sum, n_targets)``; ``eval_fn(model) -> {metric:
    value}`` adds metrics to every evaluation; ``on_best(trainer)`` runs on every rank at a new best;
    ``math_fields`` are the settings whose change alters the math a checkpoint encodes (a resume checks
    them); ``save_model(model, out)`` writes RUN/model when ``checkpoint.save_model`` is on;
    ``finish_tracking`` False: the caller writes its outputs, then closes the trackers' run itself;
    ``step_metrics()`` (optional) returns the task's own metrics of the steps since its last call, added to
    every train row (GRPO's rewards, KL, clip ratio).
    """

    model: nn.Module
    batches: Any
    total_steps: int
    loss: Callable[[nn.Module, Any], tuple[torch.Tensor, Any]] = causal_lm_loss
    val_batches: Callable[[], Iterable[Any]] | None = None
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None
    on_best: Callable[[Trainer], Any] | None = None
    math_fields: dict[str, Any] = field(default_factory=dict)
    flops_per_token: float | None = None
    bytes_per_token: float | None = None
    save_model: Callable[[nn.Module, Path], Any] | None = None
    config_dict: dict[str, Any] | None = None
    finish_tracking: bool = True
    # data mixtures (data.sources): the source of each evaluation batch, in order; the evaluation then also
    # reports val_loss/<source> (and val_bpb/<source> from its bytes per token), and val_loss / val_bpb are
    # the sources' values weighted by val_group_weights
    val_groups: list[str] | None = None
    val_group_weights: dict[str, float] | None = None
    val_group_bytes_per_token: dict[str, float] | None = None
    step_metrics: Callable[[], dict[str, float]] | None = None


class Trainer:
    """Runs ``job.total_steps`` optimizer steps of ``job.loss`` on ``job.model`` (see the module docstring).

    ``resume_from`` is decided before (`lmforge.train.resume.find_resume`): a checkpoint path, or None for a
    fresh start; ``resume_notes`` are the compatibility notes of that check (computed here when not given).
    """

    def __init__(self, cfg, job: Job, world: World | None = None, *, device: torch.device | str = "cpu",
                 resume_from: Path | str | None = None, resume_notes: list[str] | None = None):
        self.cfg = cfg
        self.job = job
        self.world = world or World()
        self.device = torch.device(device)
        cfg.train.precision = resolve_precision(cfg.train.precision, self.device)  # auto: bf16 on CUDA
        self.run_dir = Path(cfg.run.dir)
        self.total_steps = job.total_steps
        self.train_batches = job.batches
        self.val_batches = job.val_batches
        self.loss_fn = job.loss
        self.eval_fn = job.eval_fn
        self.on_best = job.on_best
        self.best_metric = getattr(cfg.eval, "metric", None) or "val_loss"
        self.maximize = getattr(cfg.eval, "metric_mode", "min") == "max"
        self.config_dict = job.config_dict if job.config_dict is not None else to_dict(cfg)
        self.math_fields = dict(job.math_fields)
        self.flops_per_token = job.flops_per_token
        self.bytes_per_token = job.bytes_per_token
        self.save_model_fn = job.save_model
        self.resume_from = Path(resume_from) if resume_from else None
        # a task that checked the checkpoint before building the model passes its notes: checked once per start
        self.resume_notes: list[str] = list(resume_notes or [])
        if self.resume_from is not None and resume_notes is None:
            self.resume_notes = check_compatible(self.resume_from, self.math_fields, cfg.checkpoint.allow_mismatch)
        model = job.model
        self.raw_model = model
        self.model = parallelize_model(model, cfg, self.world, self.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim.lr, self.total_steps)
        self.ckpt = ckpt.CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.world.rank,
                                           keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_)
        # experiment trackers (log.mlflow / log.wandb), rank 0 only; MetricsWriter hands them every row
        self.trackers = build_trackers(cfg.log, self.run_dir, getattr(cfg.run, "name", None), self.world.is_main)
        self.finish_tracking = job.finish_tracking  # False: the caller exports the model, then calls finish_run
        self.metrics = MetricsWriter(self.run_dir, enabled=self.world.is_main, tensorboard=cfg.log.tensorboard,
                                     trackers=self.trackers)
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None  # fp32 | bf16 (validated)
        # trainer state (checkpointed)
        self.step = 0
        self.tokens = 0  # input tokens that went through forward passes (all ranks)
        self.loss_tokens = 0  # targets the loss was computed on (all ranks)
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.skip_streak = 0  # steps in a row whose update was skipped (non-finite or spike)
        self.last_val: dict[str, float] = {}
        self.last_val_step: int | None = None
        # loss spikes (train.spike): the detector's history, rollbacks so far, the lowered-lr window (checkpointed)
        self.spike_cfg = cfg.train.spike
        self.spike = SpikeDetector.from_config(self.spike_cfg) if self.spike_cfg.action != "none" else None
        self.spike_rollbacks = 0
        self.spike_lr_until = 0  # steps before this one run at lr × train.spike.lr_factor
        self.spike_stop: str | None = None  # why a spike stops the run (this start only)
        # this start only
        self.signals = StopSignals()
        self.progress: Progress | None = None
        self.meter: ThroughputMeter | None = None
        self.saved_at = -1
        self.evaluated_at = -1
        self.last_saved: Path | None = None
        self.last_row: dict[str, Any] = {}

    # ---- state ---------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "config": self.config_dict,
            "math": self.math_fields,
            "config_hash": config_hash(self.math_fields),
            "schedule": self.schedule.state_dict(),
            "trainer": {"best_val": self.best_val, "best_step": self.best_step,
                        "evals_since_best": self.evals_since_best, "loss_tokens": self.loss_tokens,
                        "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                        "last_val": self.last_val, "last_val_step": self.last_val_step,
                        "skip_streak": self.skip_streak, "spike": self._spike_state()},
            "layout": self._layout(),
            "lmforge_version": __version__,
        }

    def _layout(self) -> dict[str, int]:
        """What each rank file's RNG stream belongs to: a resume restores it only on the same layout."""
        return {"world_size": self.world.world_size, "dp_size": self.world.dp_size}

    def save_checkpoint(self) -> Path:
        """Checkpoint this step. With ``checkpoint.async`` the files are written in the background and the
        path is complete once `wait_for_checkpoint` returns; the metrics row says how long training stalled
        (``stall_s``) and how much of it was waiting for the previous save (``wait_s``)."""
        rank_state = {"loader": self.train_batches.state_dict(), "rng": ckpt.rng_state()}
        path = self.ckpt.save(self.step, self.model, self.optimizer, self._meta(), rank_state)
        self.saved_at, self.last_saved = self.step, path
        self.metrics.write({"kind": "event", "step": self.step, "event": "checkpoint", "path": path.name,
                            "async": self.ckpt.async_save, "stall_s": round(self.ckpt.last_stall_s, 4),
                            "wait_s": round(self.ckpt.last_wait_s, 4)})
        return path

    def wait_for_checkpoint(self, failing: bool = False) -> None:
        """Wait for the background save in flight (the run's end, a stop, an error). ``failing``: the run is
        ending on another error, so a failed save is reported, not raised over it."""
        try:
            waited = self.ckpt.wait()
        except ckpt.CheckpointError as e:
            if not failing:
                raise
            self.message(f"note: {e}")
            return
        if waited > 0.001:
            self.metrics.write({"kind": "event", "step": self.step, "event": "checkpoint_wait",
                                "wait_s": round(waited, 4)})

    def _load_checkpoint(self, path: Path, notes: bool = True) -> None:
        meta, rank_state = self.ckpt.load(path, self.model, self.optimizer)
        self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
        t = meta.get("trainer", {})
        self.loss_tokens = int(t.get("loss_tokens", self.tokens))
        self.best_val = t.get("best_val")
        self.best_step = t.get("best_step")
        self.evals_since_best = int(t.get("evals_since_best", 0))
        self.nonfinite_total = int(t.get("nonfinite_total", 0))
        self.nonfinite_streak = int(t.get("nonfinite_streak", 0))
        self.last_val = t.get("last_val", {}) or {}
        self.last_val_step = t.get("last_val_step")
        self.skip_streak = int(t.get("skip_streak", self.nonfinite_streak))
        self._load_spike_state(t.get("spike") or {})
        if "loader" in rank_state:
            self.train_batches.load_state_dict(rank_state["loader"])
        if "rng" in rank_state and meta.get("layout") == self._layout():
            ckpt.set_rng_state(rank_state["rng"])  # the same rank's own stream: exact resume
        else:  # another world size: a fresh stream per data-parallel rank, never rank 0's copied
            seed_rank_stream(self.cfg.train.seed, self.step, self.world.dp_rank)
        if self.world.is_main and notes:
            for note in self.resume_notes + _changed_settings(meta.get("config", {}), self.config_dict):
                info(f"note: resuming with changed setting {note}")

    def weights_finite(self) -> bool:
        """True when every rank's parameters (its shards) are finite; a collective."""
        bad = 0.0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if not bool(torch.isfinite(local.detach()).all()):
                bad = 1.0
                break
        return agree([bad])[0] == 0.0

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (nats/token), perplexity and bits per byte over the evaluation set, plus
        whatever ``eval_fn`` measures.

        ``val_batches()`` returns the whole evaluation set (the same on every rank). Data-parallel rank r
        takes batches r, r + dp, …; a rank with one batch fewer runs a zero-weight forward on batch 0, so
        every rank runs the same number of forward passes (sharded models all-gather in each) and the
        summed loss equals the 1-process value on the same batches.
        """
        model = self.model
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        groups = self.job.val_groups or []
        names = list(dict.fromkeys(groups))  # row 0: every batch; row 1 + g: the batches of group g
        total = torch.zeros(1 + len(names), 2, dtype=torch.float64, device=self.device)
        extra: dict[str, float] = {}
        try:
            batches = list(self.val_batches()) if self.val_batches is not None else []
            dp, r = self.world.dp_size, self.world.dp_rank
            mine = batches[r::dp]
            for i in range(-(-len(batches) // dp)):
                weight = 1.0 if i < len(mine) else 0.0
                batch = to_device(mine[i] if weight else batches[0], self.device)
                with self._autocast():
                    loss_sum, n = self.loss_fn(model, batch)
                rows = [0, 1 + names.index(groups[r + i * dp])] if names and weight else [0]
                total[rows, 0] += weight * loss_sum.double()
                total[rows, 1] += weight * n  # summed on the device: no read-back per batch
            if self.eval_fn is not None:
                with self._autocast():
                    extra = dict(self.eval_fn(model))
        finally:
            model.train(was_training)
        if self.val_batches is not None:
            self.world.all_reduce_sum(total)
        out: dict[str, float] = {}
        if total[0, 1] > 0:
            loss = float(total[0, 0] / total[0, 1])
            out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
            if self.bytes_per_token:
                out["val_bpb"] = loss / math.log(2) / self.bytes_per_token
            if names:
                out.update(self._group_metrics(names, total[1:].tolist()))
        out.update(extra)
        if out:
            out["eval_time"] = time.perf_counter() - t0
        return _same_on_every_rank(out)

    def _group_metrics(self, names: list[str], sums: list[list[float]]) -> dict[str, float]:
        """Per-source val_loss/<name> and val_bpb/<name>, and val_loss / val_ppl / val_bpb as their weighted
        mean (``val_group_weights``; equal weights when not given)."""
        weights = self.job.val_group_weights or {}
        bpt = self.job.val_group_bytes_per_token or {}
        out: dict[str, float] = {}
        wsum = wloss = wbpb = 0.0
        all_bpb = True
        for name, (loss_sum, n) in zip(names, sums):
            if n <= 0:
                continue
            loss = loss_sum / n
            out[f"val_loss/{name}"] = loss
            w = float(weights.get(name, 1.0))
            wsum, wloss = wsum + w, wloss + w * loss
            if bpt.get(name):
                out[f"val_bpb/{name}"] = bpb = loss / math.log(2) / bpt[name]
                wbpb += w * bpb
            else:
                all_bpb = False
        if wsum > 0:
            out["val_loss"] = wloss / wsum
            out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
            if all_bpb:
                out["val_bpb"] = wbpb / wsum
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
        if self.step < self.spike_lr_until:  # lowered for a while after a rollback (train.spike.lr_factor)
            lr *= self.spike_cfg.lr_factor
        set_lr(self.optimizer, lr)
        micro = split_micro(batch, cfg.train.micro_batch)
        # Sums stay on the device through the micro-batches (no .item()/float() per micro-batch: on a GPU
        # each would stall the queue); the step reads them back once, after the all-reduce.
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # (loss sum, loss tokens, inputs)
        for i, mb in enumerate(micro):
            mb = to_device(mb, self.device)
            with no_sync(self.model, skip=i < len(micro) - 1), self._autocast():
                loss_sum, n = self.loss_fn(self.model, mb)
            loss_sum.backward()
            totals[0] += loss_sum.detach().double()
            totals[1] += n
            totals[2] += count_input_tokens(mb)
        self.world.all_reduce_sum(totals)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = totals.new_zeros(())
        if params:
            # grads hold the sum over this rank's targets, averaged over ranks by DDP -> mean per target
            # (a device-side divisor: 1 when no target was seen, which leaves the zero grads as they are)
            per_target = torch.where(totals[1] > 0, totals[1] / self.world.dp_size, 1.0)
            grads = [p.grad for p in params]
            torch._foreach_div_(grads, per_target.to(grads[0].device, grads[0].dtype))
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP2/TP
        # the step's one read-back: loss sum, targets, inputs, grad norm
        loss_total, n_global, n_inputs, grad_norm = torch.cat([totals, norm.detach().double().reshape(1).to(
            totals.device)]).tolist()
        loss = loss_total / max(n_global, 1.0)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        spike = self.spike_verdict(loss, grad_norm)  # None unless train.spike is on and every rank agrees
        update = finite and spike is None
        if update:
            self.optimizer.step()
            self.skip_streak = 0
            if self.spike is not None:
                self.spike.observe(loss, grad_norm)
        else:
            self.skip_streak += 1
        if finite:
            self.nonfinite_streak = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1  # a skipped step is a step (the schedule moves on); a rollback sets the count back
        self.tokens += int(n_inputs)
        self.loss_tokens += int(n_global)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "finite": finite, "tokens": int(n_inputs),
                "loss_tokens": int(n_global), "spike": spike}

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to ``total_steps`` (or until every rank agrees to stop); see the module docstring."""
        peak = self._start()
        stop = None
        with self.signals:
            try:
                self.model.train()
                if self.cfg.eval.at_start and self.step == 0 and self.resume_from is None:
                    self.maybe_evaluate(force=True)
                while self.step < self.total_steps:
                    try:
                        out = self.timed_step()
                    except DataExhausted as e:  # a data.sources mixture whose every weighted source stopped
                        self.message(f"step {self.step}: {e}; the run ends here")
                        stop = "data_exhausted"
                        break
                    if out.get("spike") is not None and self.handle_spike(out):
                        continue  # rolled back: the step is undone, training goes on from the checkpoint
                    self.log_step(out)
                    val = self.maybe_evaluate()
                    stop = self.should_stop(val)
                    self.maybe_checkpoint(stop)
                    if stop:
                        break
                self.progress.close()
                if stop in (None, "data_exhausted"):
                    self.final_evaluation()
                if stop not in ("diverged", "spike"):
                    self.maybe_checkpoint(None, at_end=True)
                self.wait_for_checkpoint()  # the end, a stop and a time limit leave with the save complete
                self.ckpt.close()  # the host copy of async saves is freed before the export
            except BaseException:
                self.wait_for_checkpoint(failing=True)
                raise
            finally:
                self.progress.close()
        if stop == "diverged":
            raise self._diverged()
        if stop == "spike":
            self.metrics.write({"kind": "event", "step": self.step, "event": "end", "reason": "spike",
                                "elapsed_s": time.perf_counter() - self.t_start, "time": time.time()})
            raise self._spike_stopped()
        return self._finish(stop or "max_steps", peak)

    def _start(self) -> float:
        """Run dir and config, resume (or seed this rank's stream), the start event; returns peak FLOP/s."""
        cfg, world = self.cfg, self.world
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(self.config_dict, self.run_dir / "config.yaml")
            self.trackers.start(self.config_dict, resume=self.resume_from is not None)
        self.ckpt.clean_partial()
        peak, self.peak_source = peak_flops(self.device, cfg.train.precision, cfg.log.peak_tflops)
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from)
            self.metrics.truncate_after(self.step)
            # a resumed run already holds the checkpoint (and maybe the evaluation) of its starting step
            self.saved_at, self.last_saved = self.step, self.resume_from
            self.evaluated_at = self.step if self.last_val_step == self.step else -1
            if world.is_main:
                info(f"resumed from {self.resume_from} at step {self.step} ({self.tokens:,} tokens)")
        else:
            seed_rank_stream(cfg.train.seed, 0, world.dp_rank)  # TP peers share a stream; dp ranks differ
            self.metrics.truncate_after(-1)  # a fresh run: no rows from an earlier attempt
        barrier()
        self.metrics.write({"kind": "event", "step": self.step, "event": "resume" if self.resume_from else "start",
                            "total_steps": self.total_steps, "time": time.time()})
        self.progress = Progress(self.total_steps, enabled=cfg.log.progress and world.is_main, every=cfg.log.interval)
        self.meter = ThroughputMeter(self.flops_per_token, peak, world.world_size, remeasure=lambda: peak_flops(
            self.device, cfg.train.precision, cfg.log.peak_tflops)[0])  # raised when a window beats the peak
        self.t_start = time.perf_counter()
        return peak

    def timed_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self.train_step(self.train_batches.next_batch())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.meter.add(time.perf_counter() - t0, out)
        return out

    def log_step(self, out: dict[str, Any]) -> None:
        """A metrics row every ``log.interval`` steps, the non-finite event, the progress line."""
        if not out["finite"]:
            self.message(f"step {self.step}: non-finite loss/grad (loss {out['loss']}, grad norm "
                         f"{out['grad_norm']}); update skipped ({self.nonfinite_streak} in a row)")
            self.metrics.write({"kind": "event", "step": self.step, "event": "nonfinite",
                                "loss": out["loss"], "grad_norm": out["grad_norm"]})
        if self.step % self.cfg.log.interval == 0 or self.step == self.total_steps:
            self.last_row = self._log_train(out)
        dt = self.meter.ema_dt or 1.0
        self.progress.update(self.step, out["loss"], out["lr"], out["tokens"] / dt, dt)

    def maybe_evaluate(self, force: bool = False) -> dict[str, float] | None:
        """Evaluate at step 0 (``force``) and every ``eval.interval`` steps; the same step on every rank."""
        interval = self.cfg.eval.interval
        if not self.can_evaluate or not (force or (interval and self.step % interval == 0)):
            return None
        val = self._log_eval(self.evaluate())
        self.evaluated_at = self.step
        return val

    def should_stop(self, val: dict[str, float] | None) -> str | None:
        """Agreed across ranks (max of each flag): divergence, early stop, a signal, the time limit."""
        cfg = self.cfg
        early = bool(val) and self._early_stop(val)
        limit = cfg.train.time_limit_minutes
        late = bool(limit) and now() - self.t_start > limit * 60
        diverged = self.skip_streak >= cfg.train.max_nonfinite  # non-finite (or spike-skipped) steps in a row
        spiked = self.spike_stop is not None  # decided by every rank together (`spike_verdict`)
        diverged, spiked, early, signum, late = agree([diverged, spiked, early, self.signals.signum, late])
        if signum:
            self.signals.signum = int(signum)  # a peer's signal stops this rank the same way
        if diverged:
            return "diverged"
        if spiked:
            return "spike"
        if early:
            return "early_stop"
        if self.step >= self.total_steps:
            return None  # finished anyway: the run ends as max_steps
        return "signal" if signum else ("time_limit" if late else None)

    def maybe_checkpoint(self, stop: str | None, at_end: bool = False) -> None:
        """Checkpoint every ``checkpoint.interval`` steps, on any stop, and at the end (``checkpoint.at_end``);
        only from finite weights."""
        cfg = self.cfg
        if at_end:
            due = cfg.checkpoint.at_end and self.step > 0
        else:
            due = bool(stop) or bool(cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0)
        if due and self.saved_at != self.step:
            if self.weights_finite():
                self.save_checkpoint()
            else:
                self.message(f"step {self.step}: the weights are not finite; no checkpoint written "
                             f"(the last finite one: {self.last_saved or 'none'})")
        if stop and stop not in ("diverged", "spike"):
            how = self.signals.name if stop == "signal" else stop.replace("_", " ")
            self.message(f"stopping at step {self.step}: {how}; checkpoint {self.last_saved}")

    def final_evaluation(self) -> None:
        """The evaluation of the last step (unless it just ran); it counts for the best, stops nothing."""
        if self.can_evaluate and self.evaluated_at != self.step:
            val = self._log_eval(self.evaluate())
            self.evaluated_at = self.step
            if val:
                self._early_stop(val)

    def _diverged(self) -> TrainingDiverged:
        where = (f"the last good weights (step {self.saved_at}) are checkpointed in {self.last_saved}"
                 if self.saved_at == self.step else
                 f"the weights are no longer finite, so no checkpoint was written; the last finite checkpoint is "
                 f"{self.last_saved or 'none (the run never saved finite weights)'}")
        if self.skip_streak > self.nonfinite_streak:  # spikes skipped by train.spike.action=skip among them
            return TrainingDiverged(
                f"{self.skip_streak} steps in a row skipped at step {self.step} (loss spikes or non-finite); {where}; "
                "the loss left its recent history for good: lower optim.lr, check the data, use "
                "train.spike.action=rollback or raise train.spike.k, then resume")
        return TrainingDiverged(f"{self.nonfinite_streak} non-finite steps in a row at step {self.step}; {where}; "
                                "lower optim.lr or check the data, then resume")

    # ---- loss spikes (train.spike) ---------------------------------------------------------------
    def _spike_state(self) -> dict[str, Any]:
        return {"history": self.spike.state_dict() if self.spike is not None else {},
                "rollbacks": self.spike_rollbacks, "lr_until": self.spike_lr_until}

    def _load_spike_state(self, state: dict[str, Any]) -> None:
        if self.spike is not None:
            self.spike.load_state_dict(state.get("history"))
        self.spike_rollbacks = int(state.get("rollbacks", 0))
        self.spike_lr_until = int(state.get("lr_until", 0))

    def spike_verdict(self, loss: float, grad_norm: float) -> Verdict | None:
        """This step's spike verdict, agreed by every rank (a spike any rank sees is one for all; the values
        are the all-reduced ones, so they agree anyway); None when ``train.spike`` is off or no spike."""
        if self.spike is None:
            return None
        verdict = self.spike.check(loss, grad_norm)
        if not agree([verdict is not None])[0]:
            return None
        return verdict or Verdict("peer", loss, None)

    def handle_spike(self, out: dict[str, Any]) -> bool:
        """Act on a spike per ``train.spike.action`` (every rank, together): skip (the update was not made),
        roll back, or stop. True when the run rolled back (the step is undone)."""
        verdict, action, step = out["spike"], self.spike_cfg.action, self.step
        row = {"kind": "event", "step": step, "event": "spike", "spike_step": step, "action": action,
               "loss": out["loss"], "grad_norm": out["grad_norm"], **verdict.row()}
        if action == "skip":
            if not verdict.nonfinite:  # a non-finite step is reported as always (log_step's "nonfinite" event)
                self.metrics.write({**row, "skipped_in_a_row": self.skip_streak})
                self.message(f"step {step}: loss spike, {verdict.describe()}; update skipped "
                             f"({self.skip_streak} in a row)")
            return False
        if action == "rollback" and self.spike_rollbacks < self.spike_cfg.max_rollbacks:
            if not self._rollback(verdict, row):
                return False
            self.meter.close_window(out)  # the undone steps' figures stay out of the next metrics row
            return True
        if action == "rollback":
            row["action"] = "stop"
            self.spike_stop = (f"loss spike at step {step} after {self.spike_rollbacks} rollbacks "
                               f"(train.spike.max_rollbacks={self.spike_cfg.max_rollbacks}): {verdict.describe()}")
        else:
            self.spike_stop = f"loss spike at step {step} (train.spike.action=stop): {verdict.describe()}"
        self.metrics.write({**row, "rollbacks": self.spike_rollbacks})
        return False

    def _rollback(self, verdict: Verdict, row: dict[str, Any]) -> bool:
        """Reload the newest verified checkpoint (the resume path), then put the data cursor back where the
        spike left it: the windows read since that checkpoint are skipped, exactly. Optionally lower the lr
        for ``train.spike.lr_factor_steps`` steps. False (and a stop) when there is no checkpoint to go to."""
        spike_step = self.step
        self.wait_for_checkpoint()  # an async save in flight is the newest checkpoint once it is complete
        path = ckpt.latest_checkpoint(self.ckpt.dir, verify=True)  # every rank: rank 0 verifies, all get it
        target = int(ckpt.read_meta(path)["step"]) if path is not None else None
        if target is None or target >= spike_step:
            where = "no verified checkpoint" if path is None else f"the newest checkpoint {path} is not behind it"
            self.spike_stop = (f"loss spike at step {spike_step} ({verdict.describe()}) and {where} to roll back "
                               "to; set checkpoint.interval so that one is written before a spike")
            self.metrics.write({**row, "action": "stop", "rollbacks": self.spike_rollbacks})
            return False
        data_after = self.train_batches.state_dict()  # the cursor just past the spiked step's windows
        rollbacks = self.spike_rollbacks + 1
        self._load_checkpoint(path, notes=False)
        data_from = self.train_batches.state_dict()
        self.train_batches.load_state_dict(data_after)  # skip what steps target+1 .. spike_step consumed
        self.spike_rollbacks = rollbacks
        if self.spike_cfg.lr_factor < 1:
            self.spike_lr_until = self.step + self.spike_cfg.lr_factor_steps
        self.saved_at, self.last_saved = self.step, path
        self.evaluated_at = self.step if self.last_val_step == self.step else -1
        self.metrics.truncate_after(self.step)  # the undone steps' rows go; this event stays (at the new step)
        event = {**row, "step": self.step, "checkpoint": path.name, "rollbacks": rollbacks,
                 "skipped_steps": [self.step + 1, spike_step]}
        if isinstance(data_from, dict) and "samples_seen" in data_from and "samples_seen" in data_after:
            event["skipped_samples"] = [int(data_from["samples_seen"]), int(data_after["samples_seen"])]
        if self.spike_lr_until > self.step:
            event["lr_factor_until"] = self.spike_lr_until
        self.metrics.write(event)
        skipped = (f"samples {event['skipped_samples'][0]}..{event['skipped_samples'][1] - 1}"
                   if "skipped_samples" in event else f"the data of steps {self.step + 1}..{spike_step}")
        lower = (f"; lr × {self.spike_cfg.lr_factor} until step {self.spike_lr_until}"
                 if self.spike_lr_until > self.step else "")
        self.message(f"step {spike_step}: loss spike, {verdict.describe()}; rolled back to {path} (step "
                     f"{self.step}), skipping {skipped}{lower} (rollback {rollbacks} of "
                     f"{self.spike_cfg.max_rollbacks})")
        return True

    def _spike_stopped(self) -> LossSpikeStop:
        if self.saved_at == self.step:
            where = (f"the weights from before it (its update was not applied) are checkpointed in {self.last_saved}; "
                     "running the same command again continues after the spiked step")
        else:
            where = (f"the weights are not finite, so no checkpoint was written; the last finite checkpoint is "
                     f"{self.last_saved or 'none'}")
        return LossSpikeStop(f"{self.spike_stop}; {where}; lower optim.lr or check the data (or set "
                             "train.spike.action=rollback / raise train.spike.max_rollbacks)")

    def _finish(self, stop_reason: str, peak: float) -> TrainResult:
        """The end event, RUN/model (finished runs only) and the result."""
        elapsed = time.perf_counter() - self.t_start
        self.metrics.write({"kind": "event", "step": self.step, "event": "end", "reason": stop_reason,
                            "elapsed_s": elapsed, "time": time.time()})
        self.metrics.close()
        code = exit_code(stop_reason, self.signals.signum)
        model_dir = None
        if self.cfg.checkpoint.save_model:
            if code:  # a stopped run leaves no RUN/model: `pretrain && export` cannot ship half a model
                self.message(f"no {self.run_dir / 'model'} written (the run stopped before its last step); "
                             "run the same command again to resume")
            elif not self.weights_finite():
                self.message(f"no {self.run_dir / 'model'} written: the weights are not finite")
            else:
                model_dir = self.export_model()
        if self.finish_tracking:
            self.trackers.finish_run(stop_reason, model_dir)  # report.png, config, metrics, model dir; close
        tps = self.meter.median_tok_per_s()
        return TrainResult(
            step=self.step, tokens=self.tokens, loss_tokens=self.loss_tokens, stop_reason=stop_reason,
            final_loss=self.last_row.get("loss"), val=dict(self.last_val),
            best_val_loss=self.best_val if self.best_metric == "val_loss" else None,
            best_metric=self.best_metric, best_value=self.best_val, best_step=self.best_step,
            resumed_from=str(self.resume_from) if self.resume_from else None, elapsed_s=elapsed,
            tok_per_s=tps, mfu=self.meter.mfu(tps), nonfinite_total=self.nonfinite_total,
            model_dir=str(model_dir) if model_dir else None, run_dir=str(self.run_dir),
            peak_flops_source=self.peak_source, signal=self.signals.name if stop_reason == "signal" else None,
            exit_code=code, checkpoint=str(self.last_saved) if self.last_saved else None,
            rollbacks=self.spike_rollbacks)

    def export_model(self) -> Path | None:
        """Consolidate the weights (gathered from all ranks) into RUN/model on rank 0."""
        shell = consolidate(self.model, self.world.is_main, template=unwrap(self.raw_model))
        out = self.run_dir / "model"
        if self.world.is_main:
            if self.save_model_fn is not None:
                self.save_model_fn(shell, out)
            else:
                save_model_dir(shell, out)
        barrier()
        return out

    # ---- helpers ---------------------------------------------------------------------------------
    def message(self, text: str) -> None:
        """A note on stderr from rank 0 only (every rank reaches the same notes)."""
        if self.world.is_main:
            if self.progress is not None:
                self.progress.message(text)
            else:
                info(text)

    def _log_train(self, out: dict) -> dict[str, Any]:
        window = self.meter.close_window(out)
        skipped = window.pop("skipped")
        row = {"kind": "train", "step": self.step, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
               "lr": out["lr"], **window, **memory_stats(self.device, reset=True)}  # peaks of this row's steps
        if self.job.step_metrics is not None:
            row.update(self.job.step_metrics())
        if skipped or self.nonfinite_total:
            row.update(skipped=skipped, nonfinite_total=self.nonfinite_total)
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


__all__ = [
    "Job",
    "LossSpikeStop",
    "TrainResult",
    "Trainer",
    "TrainingDiverged",
    "causal_lm_loss",
    "check_compatible",
    "find_resume",
    "format_duration",
    "input_tokens",
    "seed_rank_stream",
    "split_micro",
]
