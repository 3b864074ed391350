"""The pretraining config: one dataclass per YAML section, validated before any work starts.

Keys users' scripts rely on keep their names: ``run.dir``, ``model.preset``, ``data.dir``,
``data.seq_len``, ``train.global_batch`` (sequences), ``train.micro_batch``, ``train.max_steps``,
``train.seed``, ``train.resume`` (``auto | never | PATH``), ``optim.lr``, ``eval.interval``,
``checkpoint.interval``, ``log.interval``. This module imports no torch.
"""

from __future__ import annotations

import importlib.util
import math
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
class DataConfig:
    dir: str = ""  # token-shard dir written by `lmforge prepare`
    seq_len: int = 512
    tokenizer: str | None = None  # tokenizer dir copied into RUN/model; default: the one the index names
    doc_mask: bool = False  # attend only within documents (EOS-separated) instead of across the packed row
    cache_dir: str | None = None  # local cache for s3:// / gs:// shards (default ~/.cache/lmforge/shards)


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
    if not cfg.data.dir:
        raise ConfigError("data.dir is not set; point it at a token-shard dir written by `lmforge prepare`")
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
    "OptimConfig",
    "ParallelConfig",
    "PretrainConfig",
    "RunConfig",
    "ScheduleConfig",
    "StepsConfig",
    "TrainConfig",
    "config_dict",
    "grad_accum_steps",
    "load_config",
    "validate",
]


def resolve_precision(precision: str, device) -> str:
    """``train.precision`` for a device: ``auto`` is bf16 on CUDA (fp32 master weights, bf16 compute) and
    fp32 elsewhere (CPU bf16 matmuls are slower than fp32 on most hosts); fp32 / bf16 stay as given."""
    if precision != "auto":
        return precision
    return "bf16" if getattr(device, "type", str(device)).startswith("cuda") else "fp32"
