"""The pretraining config: one dataclass per YAML section, validated before any work starts.

Keys users' scripts rely on keep their names: ``run.dir``, ``model.preset``, ``data.dir``,
``data.seq_len``, ``train.global_batch`` (sequences), ``train.micro_batch``, ``train.max_steps``,
``train.seed``, ``train.resume`` (``auto | never | PATH``), ``optim.lr``, ``eval.interval``,
``checkpoint.interval``, ``log.interval``. This module imports no torch.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmforge.artifacts.metadata import read_metadata  # torch-free (model_dir imports torch)
from lmforge.config import ConfigError, apply_overrides, from_dict, load_config_source, to_dict
from lmforge.distributed.config import ParallelConfig  # the `parallel` section (no torch import)
from lmforge.models.presets import model_config_from_dict
from lmforge.train.trackers import MLflowLogConfig, WandbLogConfig, validate_tracker_config


@dataclass
class RunConfig:
    dir: str | None = None  # the run directory; default runs/<config file stem>
    name: str | None = None  # a label for reports; default the run dir's name
    overwrite: bool = False  # write into an existing non-empty folder that is not an lmforge run dir


@dataclass
class SourceConfig:
    """One source of a data mixture (``data.sources``): a prepared shard dir and its sampling weight."""

    name: str = ""  # names the source in data.schedule, metrics (val_loss/NAME) and checkpoints
    dir: str = ""  # token-shard dir written by `lmforge prepare` (local or s3:// / gs://)
    weight: float = 1.0  # relative sampling weight (normalised over the sources still in the mix)
    on_exhaust: Literal["repeat", "stop"] = "repeat"  # after its last window: a new epoch, or leave the mix


@dataclass
class MixPhaseConfig:
    """One phase of ``data.schedule``: the weights of steps [previous phase's until_step (or 0), until_step)."""

    until_step: int = 0  # the first step after this phase (phases run in step order)
    weights: dict[str, float] = field(default_factory=dict)  # {source name: weight}; a missing source gets 0
    interpolate: Literal["constant", "linear"] = "constant"  # linear: from the previous phase's weights to these


@dataclass
class DataConfig:
    dir: str = ""  # token-shard dir written by `lmforge prepare` (or use data.sources for a mixture)
    seq_len: int = 512
    tokenizer: str | None = None  # tokenizer dir copied into RUN/model; default: the one the index names
    doc_mask: bool = False  # attend only within documents (EOS-separated) instead of across the packed row
    cache_dir: str | None = None  # local cache for s3:// / gs:// shards (default ~/.cache/lmforge/shards)
    # a weighted mixture of shard dirs (instead of data.dir), and its weights by step (phases in step order)
    sources: list[SourceConfig] = field(default_factory=list)
    schedule: list[MixPhaseConfig] = field(default_factory=list)

    def shard_dirs(self) -> list[str]:
        """Every shard dir the run reads: data.dir, or each source's."""
        return [s.dir for s in self.sources] if self.sources else [self.dir]


_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate_data_sources(d: DataConfig) -> None:
    """data.dir xor data.sources; unique names; finite weights >= 0, some positive; phases in step order."""
    if d.sources and d.dir:
        raise ConfigError("set data.dir or data.sources, not both (a single dir is a one-source mixture)")
    if not d.sources:
        if not d.dir:
            raise ConfigError("data.dir is not set; point it at a token-shard dir written by `lmforge prepare` "
                              "(or list data.sources)")
        if d.schedule:
            raise ConfigError("data.schedule needs data.sources (the weights it changes); drop it or list the "
                              "sources")
        return
    names: list[str] = []
    for i, s in enumerate(d.sources):
        if not _SOURCE_NAME.match(s.name or ""):
            raise ConfigError(f"data.sources[{i}].name={s.name!r} must be a word of letters, digits, '_', '-' "
                              "or '.' (e.g. web)")
        if s.name in names:
            raise ConfigError(f"data.sources: the name '{s.name}' appears twice; give every source its own name")
        if not s.dir:
            raise ConfigError(f"data.sources[{i}] ('{s.name}') has no dir; set it to a shard dir from "
                              "`lmforge prepare`")
        if not (math.isfinite(s.weight) and s.weight >= 0):
            raise ConfigError(f"data.sources[{i}].weight={s.weight} must be a finite number >= 0")
        names.append(s.name)
    if not any(s.weight > 0 for s in d.sources):
        raise ConfigError("data.sources: every weight is 0; give at least one source a positive weight")
    prev = 0
    for i, ph in enumerate(d.schedule):
        if ph.until_step <= prev:
            raise ConfigError(f"data.schedule[{i}].until_step={ph.until_step} must be greater than {prev} (the "
                              "previous phase's end, or step 0); phases run in step order")
        unknown = sorted(set(ph.weights) - set(names))
        if unknown:
            raise ConfigError(f"data.schedule[{i}].weights names '{unknown[0]}', which is not in data.sources "
                              f"({', '.join(names)})")
        for k, v in ph.weights.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"data.schedule[{i}].weights.{k}={v!r} must be a finite number >= 0")
        if not any(float(v) > 0 for v in ph.weights.values()):
            raise ConfigError(f"data.schedule[{i}].weights gives no source a positive weight")
        prev = ph.until_step


@dataclass
class SpikeConfig:
    """``train.spike``: what a loss spike is (``lmforge.train.spike``) and what the run does about one.

    A spike is a step whose ``metric`` lies above ``median + k · MAD`` of the last ``window`` applied steps
    (once ``min_history`` of them are known), or whose loss or grad norm is not finite. ``skip``: no update
    for that step (it still counts as a step; ``train.max_nonfinite`` skipped steps in a row stop the run);
    ``rollback``: reload the last verified checkpoint, skip the data consumed since it and go on (at most
    ``max_rollbacks`` times in the run), with the lr × ``lr_factor`` for ``lr_factor_steps`` steps; ``stop``:
    checkpoint the weights from before the spike and stop (exit 2). ``none``: no detection; a non-finite step
    is skipped as always."""

    action: Literal["none", "skip", "rollback", "stop"] = "none"
    metric: Literal["loss", "grad_norm", "both"] = "loss"  # what is watched (non-finite values always count)
    window: int = 100  # applied steps the median and MAD are taken over
    k: float = 6.0  # a spike lies above median + k · MAD
    min_history: int = 20  # steps needed before the threshold applies (non-finite counts from step 1)
    max_rollbacks: int = 3  # rollbacks allowed in the whole run (kept in checkpoints); one more spike stops
    lr_factor: float = 1.0  # after a rollback the lr is multiplied by this ...
    lr_factor_steps: int = 0  # ... for this many steps (0 = the lr is left alone)


@dataclass
class StepsConfig:
    """The ``train:`` keys every stage shares: batch sizes, the step limit, seed, resume, device, precision and
    the loss's numerics. Each stage's ``train:`` section is this plus its own keys (pretraining: token-counted
    batch and length, the objective; fine-tuning: epochs), so no stage accepts a key only another one uses."""

    global_batch: int | None = None  # sequences per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per forward/backward on one rank
    max_steps: int | None = None
    seed: int = 0
    resume: str = "auto"  # auto | never | PATH (a checkpoint dir, a run's checkpoints/ dir or a run dir)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: autocast over fp32 master weights (no fp16: no loss scaling); auto: bf16 on CUDA, fp32 elsewhere
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    compile: bool = False  # torch.compile the model (optional; off by default)
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    time_limit_minutes: float | None = None  # checkpoint and stop after this long; a re-run resumes
    threads: int | None = None  # torch CPU threads (default: torch's choice)
    # the LM loss (lmforge.train.losses): tokens per chunk of the head + cross-entropy (0 = whole logits at once),
    # and the z-loss coefficient on logsumexp² per target (PaLM; e.g. 1e-4; 0 = off; training only)
    loss_chunk_tokens: int = 1024
    z_loss: float = 0.0
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # loss-spike detection and rollback (train.spike)


@dataclass
class TrainConfig(StepsConfig):
    """Pretraining's ``train:`` section: the shared keys plus token budgets and the objective."""

    global_batch_tokens: int | None = None  # alternative to global_batch: tokens per step (multiple of seq_len)
    max_tokens: int | None = None  # alternative to max_steps
    objective: Literal["clm", "mlm"] = "clm"  # mlm: BERT masked-LM pretraining of an encoder preset


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW for the rest
    lr: float = 3e-4  # AdamW's peak lr (and the schedule's reference)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_norms_and_biases: bool = False  # by default norms and biases get no weight decay
    decay_embeddings: bool = False  # by default embeddings (and a tied head) get no weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    fused: bool | None = None  # AdamW implementation: None = fused where supported (CPU/CUDA), False = foreach
    # Muon (optim.name=muon; lmforge.train.muon): the hidden matrices of the transformer blocks
    muon_lr: float | None = None  # Muon's peak lr; None = optim.lr (the match_rms_adamw scale makes it transfer)
    muon_weight_decay: float | None = None  # decoupled, on the Muon matrices; None = optim.weight_decay
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton–Schulz iterations
    muon_lr_adjust: Literal["match_rms_adamw", "original", "none"] = "match_rms_adamw"  # update × 0.2·sqrt(max(A,B))
    muon_ns_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # Newton–Schulz precision; auto = bf16 on CUDA, fp32 on CPU
    muon_ns_work: Literal["split", "replicate"] = "split"  # sharded matrices: one owner rank each, or every rank


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup_steps: int = 0
    min_lr: float | None = None  # floor of the decay; None = 0.1 × optim.lr
    decay_fraction: float = 0.2  # wsd: the last fraction of steps that decays to min_lr
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"  # wsd decay shape


@dataclass
class EvalConfig:
    interval: int = 0  # steps between evaluations; 0 = only at the end
    batches: int = 20  # validation batches per evaluation
    batch_size: int | None = None  # sequences per validation batch; default train.micro_batch
    at_start: bool = True  # evaluate once before the first step (the curve's starting point)
    patience: int = 0  # early stopping: stop after this many evaluations without improvement; 0 = off
    min_delta: float = 0.0  # an improvement must lower val loss by more than this


@dataclass
class CheckpointConfig:
    YAML_KEYS: ClassVar[dict[str, str]] = {"async": "async_"}  # `async` is a keyword: field async_, YAML key async

    interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3  # complete checkpoints to keep (the newest is never deleted)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, forever; 0 = off
    async_: bool = False  # save in the background (DCP async save from a host copy; written `async:` in YAML)
    at_end: bool = True  # checkpoint the final step
    allow_mismatch: list[str] = field(default_factory=list)  # math-changing fields allowed to differ on resume
    save_model: bool = True  # write the consolidated RUN/model/ at the end


@dataclass
class LogConfig:
    interval: int = 10  # steps between metrics.jsonl rows
    tensorboard: bool = False  # also write TensorBoard events to RUN/tensorboard (needs `tensorboard`)
    progress: bool = True  # a progress line on stderr with loss and ETA
    peak_tflops: float | None = None  # MFU denominator per device; None = measured (CPU) or the GPU's spec
    mlflow: MLflowLogConfig | None = None  # track the run in MLflow (lmforge.train.trackers); None = off
    wandb: WandbLogConfig | None = None  # track the run in Weights & Biases; None = off


# Keys of the model section that steer initialization, not the architecture (lmforge.models.embedding_init).
MODEL_INIT_KEYS = ("init_embeddings_from", "from")


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: dict[str, Any] = field(default_factory=dict)  # {preset: NAME, <ModelConfig field>: value, ...}
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def model_config(self):
        """The resolved lmforge ModelConfig (preset + overrides)."""
        if not self.model:
            raise ConfigError("model section is empty; set model.preset (see `lmforge model list`)")
        if self.model.get("from"):  # continued pretraining: the architecture is the model dir's (h-shard)
            extra = sorted(k for k in self.model if k not in MODEL_INIT_KEYS)
            if extra:
                raise ConfigError(f"model.from takes the architecture from '{self.model['from']}'; drop model.{extra[0]}")
            if not Path(str(self.model["from"])).is_dir():
                raise ConfigError(f"model.from='{self.model['from']}' is not a directory; point it at a model dir "
                                  "(RUN/model of a pretraining run, or `lmforge import` output)")
            return read_metadata(self.model["from"]).model_config()
        try:  # init options (model.init_embeddings_from) are not part of the architecture
            return model_config_from_dict({k: v for k, v in self.model.items() if k not in MODEL_INIT_KEYS})
        except TypeError as e:
            raise ConfigError(f"model: {e}") from None

    def steps_for(self, seq_len: int | None = None) -> int:
        """max_steps, or max_tokens converted to steps."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        per_step = self.global_batch_size * (seq_len or self.data.seq_len)
        return math.ceil(self.train.max_tokens / per_step)

    @property
    def global_batch_size(self) -> int:
        if self.train.global_batch is not None:
            return self.train.global_batch
        return self.train.global_batch_tokens // self.data.seq_len


def grad_accum_steps(global_batch: int, micro_batch: int, dp_ranks: int) -> int:
    """global batch ÷ (micro batch × data-parallel ranks), or a ConfigError saying what would divide."""
    denom = micro_batch * dp_ranks
    if global_batch % denom:
        up = math.ceil(global_batch / denom) * denom
        raise ConfigError(
            f"train.global_batch={global_batch} is not divisible by train.micro_batch={micro_batch} × "
            f"{dp_ranks} rank{'s' if dp_ranks != 1 else ''}; try train.global_batch={up}"
        )
    return global_batch // denom


def validate_common(cfg) -> None:
    """Checks of the sections every recipe shares (train limits, optim, schedule, eval, checkpoint, log);
    pretraining and fine-tuning add their own on top."""
    t, o, s, e, c, lg = cfg.train, cfg.optim, cfg.schedule, cfg.eval, cfg.checkpoint, cfg.log
    if t.max_nonfinite <= 0:
        raise ConfigError(f"train.max_nonfinite={t.max_nonfinite} must be at least 1")
    if t.time_limit_minutes is not None and t.time_limit_minutes <= 0:
        raise ConfigError(f"train.time_limit_minutes={t.time_limit_minutes} must be positive")
    if t.threads is not None and t.threads <= 0:
        raise ConfigError(f"train.threads={t.threads} must be positive")
    if t.loss_chunk_tokens < 0:
        raise ConfigError(f"train.loss_chunk_tokens={t.loss_chunk_tokens} must be >= 0 (0 computes the loss "
                          "over the whole logits at once; e.g. 1024)")
    if not (math.isfinite(t.z_loss) and t.z_loss >= 0):
        raise ConfigError(f"train.z_loss={t.z_loss} must be a finite number >= 0 (0 turns it off; e.g. 1e-4)")
    if t.resume not in ("auto", "never") and not Path(t.resume).exists():
        raise ConfigError(f"train.resume='{t.resume}' is neither auto, never nor an existing checkpoint path")
    for key, value in (("optim.lr", o.lr), ("optim.eps", o.eps), ("optim.weight_decay", o.weight_decay),
                       ("optim.grad_clip", o.grad_clip), *((f"optim.betas[{i}]", b) for i, b in enumerate(o.betas))):
        if not math.isfinite(value):  # nan/inf would train to non-finite weights (or slip past the checks below)
            raise ConfigError(f"{key}={value} must be a finite number; e.g. optim.lr=3e-4, optim.betas=[0.9, 0.95], "
                              "optim.eps=1e-8, optim.weight_decay=0.1, optim.grad_clip=1.0")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps={o.eps} must be positive")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip={o.grad_clip} must be >= 0 (0 turns clipping off)")
    validate_muon(o)
    if s.warmup_steps < 0:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    if s.min_lr is not None and not 0.0 <= s.min_lr <= o.lr:
        raise ConfigError(f"schedule.min_lr={s.min_lr} must be in [0, optim.lr={o.lr}]")
    if not 0.0 < s.decay_fraction <= 1.0:
        raise ConfigError(f"schedule.decay_fraction={s.decay_fraction} must be in (0, 1]")
    for key, value in (("eval.interval", e.interval), ("eval.batches", e.batches), ("eval.patience", e.patience),
                       ("checkpoint.interval", c.interval), ("eval.min_delta", e.min_delta)):
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if e.batch_size is not None and e.batch_size <= 0:
        raise ConfigError(f"eval.batch_size={e.batch_size} must be positive")
    if e.patience and not e.interval:
        raise ConfigError("eval.patience needs periodic evaluation; set eval.interval > 0")
    if c.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={c.keep_last} must be at least 1 (the newest is always kept)")
    if c.keep_every < 0:
        raise ConfigError(f"checkpoint.keep_every={c.keep_every} must be >= 0 (0 keeps only the last "
                          "checkpoint.keep_last; e.g. 1000 also keeps step 1000, 2000, ...)")
    if lg.interval <= 0:
        raise ConfigError(f"log.interval={lg.interval} must be positive")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        raise ConfigError(f"log.peak_tflops={lg.peak_tflops} must be positive")
    if lg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: pip install tensorboard "
                          "(or set log.tensorboard=false)")
    validate_tracker_config(lg.mlflow, lg.wandb)
    validate_spike(t.spike)
    if t.spike.action == "rollback" and not c.interval:
        raise ConfigError("train.spike.action=rollback goes back to the last checkpoint; set checkpoint.interval > 0 "
                          "(e.g. 500), or use train.spike.action=skip")


def validate_spike(sp: SpikeConfig) -> None:
    """The train.spike keys (checked whatever the action, so a typo does not wait for a spike)."""
    if sp.window < 1:
        raise ConfigError(f"train.spike.window={sp.window} must be at least 1 (e.g. 100 steps)")
    if not 1 <= sp.min_history <= sp.window:
        raise ConfigError(f"train.spike.min_history={sp.min_history} must be in 1..train.spike.window={sp.window} "
                          f"(e.g. {min(20, sp.window)})")
    if not (math.isfinite(sp.k) and sp.k > 0):
        raise ConfigError(f"train.spike.k={sp.k} must be a finite number > 0 (e.g. 6: median + 6 MAD)")
    if sp.max_rollbacks < 1:
        raise ConfigError(f"train.spike.max_rollbacks={sp.max_rollbacks} must be at least 1 (or use "
                          "train.spike.action=stop)")
    if not (math.isfinite(sp.lr_factor) and 0 < sp.lr_factor <= 1):
        raise ConfigError(f"train.spike.lr_factor={sp.lr_factor} must be in (0, 1] (e.g. 0.5; 1 leaves the lr alone)")
    if sp.lr_factor_steps < 0:
        raise ConfigError(f"train.spike.lr_factor_steps={sp.lr_factor_steps} must be >= 0")
    if sp.lr_factor < 1 and not sp.lr_factor_steps:
        raise ConfigError(f"train.spike.lr_factor={sp.lr_factor} needs train.spike.lr_factor_steps > 0 "
                          "(how many steps after a rollback the lower lr lasts, e.g. 100)")


def validate_muon(o: OptimConfig) -> None:
    """The optim.muon_* keys (checked whatever optim.name is, so a typo does not wait for a switch to muon)."""
    for key, value in (("optim.muon_lr", o.muon_lr), ("optim.muon_weight_decay", o.muon_weight_decay),
                       ("optim.muon_momentum", o.muon_momentum)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number; e.g. optim.muon_lr=3e-4, "
                              "optim.muon_weight_decay=0.1, optim.muon_momentum=0.95")
    if o.muon_lr is not None and o.muon_lr <= 0:
        raise ConfigError(f"optim.muon_lr={o.muon_lr} must be positive (or unset to use optim.lr)")
    if o.muon_weight_decay is not None and o.muon_weight_decay < 0:
        raise ConfigError(f"optim.muon_weight_decay={o.muon_weight_decay} must be >= 0")
    if not 0.0 <= o.muon_momentum < 1.0:
        raise ConfigError(f"optim.muon_momentum={o.muon_momentum} must be in [0, 1), e.g. 0.95")
    if not 1 <= o.muon_ns_steps <= 20:
        raise ConfigError(f"optim.muon_ns_steps={o.muon_ns_steps} must be in 1..20 (5 is the usual)")


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no files: types were checked by `from_dict`; these are value and combination checks."""
    t, s, e = cfg.train, cfg.schedule, cfg.eval
    validate_data_sources(cfg.data)
    if cfg.data.seq_len <= 0:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be positive")
    if (t.global_batch is None) == (t.global_batch_tokens is None):
        raise ConfigError("set exactly one of train.global_batch (sequences) and train.global_batch_tokens")
    if t.global_batch_tokens is not None and (t.global_batch_tokens <= 0 or t.global_batch_tokens % cfg.data.seq_len):
        k = max(1, round(t.global_batch_tokens / cfg.data.seq_len))
        raise ConfigError(f"train.global_batch_tokens={t.global_batch_tokens} is not a positive multiple of "
                          f"data.seq_len={cfg.data.seq_len}; try {k * cfg.data.seq_len}")
    if cfg.global_batch_size <= 0:
        raise ConfigError(f"train.global_batch={cfg.global_batch_size} must be positive")
    if t.micro_batch <= 0:
        raise ConfigError(f"train.micro_batch={t.micro_batch} must be positive")
    if (t.max_steps is None) == (t.max_tokens is None):
        raise ConfigError("set exactly one of train.max_steps and train.max_tokens")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be positive")
    if t.max_tokens is not None and t.max_tokens <= 0:
        raise ConfigError(f"train.max_tokens={t.max_tokens} must be positive")
    validate_common(cfg)
    steps = cfg.steps_for()
    if s.warmup_steps > steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} exceeds the run's {steps} steps; "
                          f"lower it (e.g. {max(0, steps // 10)})")
    if e.patience and not e.batches:
        raise ConfigError("eval.patience needs validation batches; set eval.batches > 0")
    mcfg = cfg.model_config()
    if t.objective == "mlm":
        if mcfg.causal or mcfg.lm_head:
            raise ConfigError("train.objective=mlm needs an encoder: model.causal=false and model.lm_head=false "
                              "(e.g. model.preset=bert-base)")
    elif not mcfg.causal or not mcfg.lm_head:
        raise ConfigError("pretraining needs a causal LM: model.causal=true and model.lm_head=true "
                          "(or train.objective=mlm for an encoder)")
    vectors = cfg.model.get("init_embeddings_from")
    if vectors is not None and not Path(str(vectors)).is_file():
        raise ConfigError(f"model.init_embeddings_from='{vectors}' does not exist; pass a word2vec/GloVe/fastText "
                          "text-format vector file")
    if mcfg.pos_encoding in ("learned", "sinusoidal") and cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len} "
                          f"for {mcfg.pos_encoding} positions; lower data.seq_len or raise model.max_seq_len")


def load_config(path: str | None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> PretrainConfig:
    """YAML file or packaged recipe (or ``base``) + ``section.key=value`` overrides -> a validated PretrainConfig."""
    data = load_config_source(path) if path else dict(base or {})
    data = apply_overrides(data, overrides)
    cfg = from_dict(PretrainConfig, data)
    if cfg.run.dir is None:
        stem = Path(path).stem if path else "run"
        cfg.run.dir = str(Path("runs") / stem)
    if cfg.run.name is None:
        cfg.run.name = Path(cfg.run.dir).name
    validate(cfg)
    return cfg


def config_dict(cfg: PretrainConfig) -> dict[str, Any]:
    return to_dict(cfg)


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "MixPhaseConfig",
    "OptimConfig",
    "ParallelConfig",
    "PretrainConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceConfig",
    "SpikeConfig",
    "StepsConfig",
    "TrainConfig",
    "config_dict",
    "grad_accum_steps",
    "load_config",
    "validate",
    "validate_spike",
]


def resolve_precision(precision: str, device) -> str:
    """``train.precision`` for a device: ``auto`` is bf16 on CUDA (fp32 master weights, bf16 compute) and
    fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most hosts); fp32 / bf16 stay as given."""
    if precision != "auto":
        return precision
    return "bf16" if getattr(device, "type", str(device)).startswith("cuda") else "fp32"
