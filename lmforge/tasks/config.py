"""The fine-tuning config: pretraining's sections (run, train, optim, schedule, eval, checkpoint, log,
parallel) plus ``model.from``, ``finetune``, ``lora``, ``classify``, ``dpo``, ``grpo`` and fine-tuning ``data`` keys.

Keys users' scripts rely on: ``model.from`` (a model dir), ``finetune.mode`` (``sft | lora | classify | dpo | reward |
grpo``),
``data.train``, ``data.dev``, ``data.format`` (``alpaca | chat | sharegpt | prompt_completion | labels``),
``data.text_field``, ``data.label_field``, ``lora.rank``, ``lora.alpha``, ``lora.targets``, and from
pretraining ``run.dir``, ``train.*``, ``optim.*``, ``eval.interval``, ``checkpoint.interval``,
``log.interval``. This module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from lmforge.artifacts.metadata import read_metadata
from lmforge.config import ConfigError, UserError, apply_overrides, from_dict, load_config_source, to_dict
from lmforge.distributed.config import ParallelConfig
from lmforge.train.config import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StepsConfig,
    validate_common,
)


@dataclass(frozen=True)
class ModeSpec:
    """What the config must know of a fine-tuning task to check a recipe without importing the task (this
    module imports no torch); everything else about the task is in its module (`lmforge.tasks.registry`)."""

    reads: Literal["chat", "labels", "pairs", "prompts"]  # its data: which data.format values apply
    metrics: tuple[str, ...] = ()  # the higher-is-better metrics its evaluation reports (eval.metric choices)
    default_metric: str = "val_loss"  # eval.metric when unset
    lora: str | None = None  # what switches LoRA on: "always", or the config key (classify.method=lora, dpo.lora)


MODE_SPECS: dict[str, ModeSpec] = {
    "sft": ModeSpec("chat"),
    "lora": ModeSpec("chat", lora="always"),
    "classify": ModeSpec("labels", ("accuracy", "macro_f1"), "accuracy", lora="classify.method"),
    "dpo": ModeSpec("pairs", ("rewards/accuracies", "rewards/margins"), lora="dpo.lora"),
    "reward": ModeSpec("pairs", ("accuracy", "margin"), "accuracy", lora="classify.method"),
    "grpo": ModeSpec("prompts", ("reward",), "reward", lora="grpo.lora"),
}
MODES = tuple(MODE_SPECS)
SFT_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion")
# Metrics an evaluation reports, and which way is better.
MAXIMIZE = ("accuracy", "macro_f1", "rewards/accuracies", "rewards/margins", "margin", "reward")  # ModeSpec.metrics
MINIMIZE = ("val_loss", "val_ppl")


@dataclass
class ModelSource:
    """``model:`` — the model dir to start from (``from``) and training-time changes to it."""

    path: str = ""  # written `from:` in YAML (a Python keyword, hence the field name)
    dropout: float | None = None  # dropout in the backbone while fine-tuning; None = the model's own

    @staticmethod
    def from_yaml(data: Any) -> ModelSource:
        if data is None:
            data = {}
        if isinstance(data, str):  # model: DIR
            data = {"from": data}
        if not isinstance(data, dict):
            raise ConfigError(f"model must be a mapping with 'from: MODEL_DIR', got {data!r}")
        data = dict(data)
        if "path" in data and "from" not in data:
            data["from"] = data.pop("path")
        if "preset" in data:
            raise ConfigError("model.preset does not apply to fine-tuning; set model.from to a model dir "
                              "(RUN/model of a pretraining run, or `lmforge import --hf DIR --out DIR`)")
        data["path"] = data.pop("from", "")
        return from_dict(ModelSource, data, prefix="model")

    def to_yaml(self) -> dict[str, Any]:
        return {"from": self.path, "dropout": self.dropout}


@dataclass
class FinetuneSection:
    mode: Literal["sft", "lora", "classify", "dpo", "reward", "grpo"] = "sft"


@dataclass
class DpoSection:
    """``dpo:`` — preference tuning (finetune.mode=dpo); see lmforge/tasks/preference.py."""

    loss: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # sigmoid / simpo: conservative DPO's ε
    gamma: float = 0.5  # simpo: target reward margin γ
    lambda_: float = 0.1  # orpo: weight λ of the odds-ratio term (written `lambda:` in YAML)
    lora: bool = False  # train LoRA adapters (the lora: section) instead of every weight
    precompute_ref: bool = False  # reference log-probs computed once and stored in the run dir
    max_prompt_len: int | None = None  # prompts are cut to their last N tokens when a pair is too long; None: seq_len/2


@dataclass
class RewardSpec:
    """One ``grpo.rewards`` entry: a reward function and its weight (lmforge/tasks/grpo_rewards.py)."""

    name: Literal["answer", "format", "length", "python"] = "answer"  # which reward function (see its keys below)
    weight: float = 1.0  # the reward is Σ weight × value over the entries
    mode: Literal["auto", "exact", "numeric"] = "auto"  # answer: how the answer is compared
    tolerance: float = 1e-6  # answer: numbers equal within tolerance × max(1, |answer|)
    pattern: str | None = None  # format: a regex the completion must match (re.search, DOTALL)
    full: bool = False  # format: the whole completion must match
    target_tokens: int = 0  # length: completions longer than this lose (tokens − target) / max_completion_length
    function: str | None = None  # python: FILE.py:NAME (your own code; see the reward trust model)


@dataclass
class GrpoSection:
    """``grpo:`` — online RL with verifiable rewards (finetune.mode=grpo); see lmforge/tasks/grpo.py. Names as
    TRL's GRPOConfig. train.global_batch counts completions per step (num_generations per prompt)."""

    num_generations: int = 8  # G: completions sampled per prompt (one group)
    max_completion_length: int = 256  # tokens generated per completion at most
    temperature: float = 1.0  # sampling temperature (the loss scores log-probs at the same temperature)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    beta: float = 0.0  # weight of the KL penalty to the reference (0 = no reference model)
    epsilon: float = 0.2  # clip range of the importance ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher sets it larger)
    num_iterations: int = 1  # optimizer steps on each batch of rollouts (μ); > 1 uses the importance ratio
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"  # how per-token losses are averaged
    scale_rewards: bool = True  # divide advantages by the group's reward std (false: Dr. GRPO)
    use_bias_correction_kl: bool = True  # multiply the KL term by the ratio (TRL's default)
    rewards: list[RewardSpec] = field(default_factory=list)  # empty: [{name: answer}]
    lora: bool = False  # train LoRA adapters (the lora: section); the reference is then the adapters-off base
    sample_interval: int = 10  # RUN/completions/step_N.jsonl: the rollouts training every N-th step (0 = never)
    eval_max_prompts: int = 64  # dev prompts scored greedily at each evaluation (reward, rewards/<fn>/mean)


@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["wq", "wv"])  # or attention | mlp | all-linear
    save_adapter: bool = True  # also write RUN/adapter/ (adapter weights + a reference to the base model)


@dataclass
class ClassifySection:
    method: Literal["full", "lora"] = "full"  # train the whole backbone, or LoRA adapters + the head
    pooling: Literal["last", "mean", "first"] = "last"
    dropout: float = 0.1  # on the pooled vector, before the head
    labels: list[str] | None = None  # fix the label list and order; default: sorted labels of data.train


@dataclass
class TrainFile:
    """A weighted ``data.train`` entry: ``{path: FILE, weight: W}`` (a plain path is weight 1)."""

    path: str = ""
    weight: float = 1.0  # examples per epoch as a multiple of the file's: 2 = each twice, 0.5 = a seeded half


@dataclass
class FinetuneDataConfig:
    # json/jsonl (sft, lora) or tsv/csv/jsonl (classify); an entry may be {path, weight} to up- or down-sample it
    train: list[str | TrainFile] = field(default_factory=list)
    dev: list[str] = field(default_factory=list)  # held-out split; empty = dev_fraction of train
    dev_fraction: float = 0.05  # used only without data.dev: a seeded share of train held out
    format: Literal["auto", "alpaca", "chat", "sharegpt", "prompt_completion", "labels"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # rename fields, e.g. {instruction: zh_instruction}
    text_field: str | None = None  # labels: text column (name, or number for header-less files)
    label_field: str = "label"  # labels: label column
    delimiter: str | None = None  # labels: column separator (default: ',' for .csv, tab otherwise)
    seq_len: int | None = None  # longest example (tokens; longer ones are cut); None: the model's context,
    # at most SEQ_LEN_CAP
    batching: Literal["pack", "group", "shuffle"] = "pack"  # sft/lora rows: packed or one example per row
    chat_template: str | None = None  # Jinja text or .jinja file; default: the tokenizer's
    max_train_examples: int | None = None  # read at most this many (the first N of the files)
    max_dev_examples: int | None = None

    def train_files(self) -> list[tuple[str, float]]:
        """``data.train`` as (path, weight) pairs."""
        return [(e.path, e.weight) if isinstance(e, TrainFile) else (str(e), 1.0) for e in self.train]

    def train_paths(self) -> list[str]:
        return [p for p, _ in self.train_files()]

    @property
    def weighted(self) -> bool:
        """True when some data.train entry has a weight other than 1."""
        return any(w != 1.0 for _, w in self.train_files())


@dataclass
class FinetuneTrainConfig(StepsConfig):
    """Fine-tuning's ``train:`` section: the shared keys plus ``epochs``."""

    global_batch: int | None = 32  # examples (classify, unpacked sft) or packed rows per optimizer step
    micro_batch: int = 8
    epochs: float | None = None  # alternative to max_steps: passes over data.train
    # pretraining's keys, which fine-tuning runs' config.yaml spelled out (as null / clm) before this section had
    # its own class: read when they hold that value, refused with their fix otherwise
    OTHER_STAGE_KEYS: ClassVar[dict[str, tuple[Any, str]]] = {
        "global_batch_tokens": (None, "is for pretraining; fine-tuning counts examples: set train.global_batch"),
        "max_tokens": (None, "is for pretraining; fine-tuning runs train.max_steps or train.epochs"),
        "objective": ("clm", "is for pretraining (clm or mlm); fine-tuning's objective follows finetune.mode"),
    }


@dataclass
class FinetuneEvalConfig(EvalConfig):
    interval: int = 0
    batches: int = 1000  # at most this many dev batches per evaluation (0 = no evaluation)
    metric: str | None = None  # what early stopping and keep_best follow; None: val_loss (sft/lora), accuracy
    metric_mode: Literal["auto", "min", "max"] = "auto"  # auto: max for accuracy/macro_f1, min otherwise
    keep_best: bool = True  # RUN/model gets the weights of the best evaluation, not of the last step


@dataclass
class FinetuneConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSource = field(default_factory=ModelSource)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoraSection = field(default_factory=LoraSection)
    classify: ClassifySection = field(default_factory=ClassifySection)
    dpo: DpoSection = field(default_factory=DpoSection)
    grpo: GrpoSection = field(default_factory=GrpoSection)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def mode(self) -> str:
        return self.finetune.mode

    @property
    def spec(self) -> ModeSpec:
        return MODE_SPECS[self.mode]

    @property
    def uses_lora(self) -> bool:
        """True when only LoRA adapters (and a task's head) train, per the mode's switch (`ModeSpec.lora`)."""
        switch = self.spec.lora
        return (switch == "always" or (switch == "classify.method" and self.classify.method == "lora")
                or (switch == "dpo.lora" and self.dpo.lora) or (switch == "grpo.lora" and self.grpo.lora))

    @property
    def global_batch_size(self) -> int:
        return int(self.train.global_batch)

    def steps_for(self, units_per_epoch: int) -> int:
        """max_steps, or epochs × optimizer steps per epoch (``units_per_epoch`` // global batch)."""
        if self.train.max_steps is not None:
            return self.train.max_steps
        per_epoch = max(1, units_per_epoch // self.global_batch_size)
        return max(1, math.ceil(self.train.epochs * per_epoch))

    def lora_config(self):
        # lazy: models.lora imports torch and this module imports none (configs are checked before torch loads)
        from lmforge.models.lora import LoraConfig

        return LoraConfig(rank=self.lora.rank, alpha=self.lora.alpha, dropout=self.lora.dropout,
                          targets=list(self.lora.targets))


def validate(cfg: FinetuneConfig) -> None:
    """Value and combination checks that need no files (types were checked by `from_dict`)."""
    t, s, e, d = cfg.train, cfg.schedule, cfg.eval, cfg.data
    if not cfg.model.path:
        raise ConfigError("model.from is not set; point it at a model dir (RUN/model of a pretraining run, "
                          "or the output of `lmforge import --hf DIR --out DIR`)")
    if cfg.model.dropout is not None and not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if not d.train:
        raise ConfigError("data.train is not set; give one or more data files (json/jsonl for sft/lora, "
                          "tsv/csv/jsonl with a label column for classify)")
    for i, (path, weight) in enumerate(d.train_files()):
        if not path:
            raise ConfigError(f"data.train[{i}] has no path; write {{path: FILE, weight: W}} or just FILE")
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"data.train[{i}].weight={weight} must be a finite number >= 0 (2 = every example "
                              "twice per epoch, 0.5 = a seeded half)")
    if not any(w > 0 for _, w in d.train_files()):
        raise ConfigError("data.train: every weight is 0; give at least one file a positive weight")
    reads = cfg.spec.reads
    if reads == "labels" and d.format not in ("auto", "labels"):
        raise ConfigError(f"finetune.mode={cfg.mode} reads labelled data; data.format={d.format} should be labels "
                          "(or auto)")
    if reads == "pairs" and d.format != "auto":
        raise ConfigError(f"finetune.mode={cfg.mode} reads preference pairs (prompt/chosen/rejected, LLaMA-Factory "
                          f"ranking or ShareGPT pairs, detected per record); data.format={d.format} should be auto")
    if reads == "prompts" and d.format != "auto":
        raise ConfigError(f"finetune.mode={cfg.mode} reads prompts with answers ({{prompt, answer}} or "
                          f"{{messages, answer}}, detected per record); data.format={d.format} should be auto")
    if reads != "labels" and d.format == "labels":
        labelled = " or ".join(m for m, spec in MODE_SPECS.items() if spec.reads == "labels")
        raise ConfigError(f"data.format=labels is for finetune.mode={labelled}, not {cfg.mode}; use alpaca, chat, "
                          "sharegpt or prompt_completion (or auto)")
    if not d.dev and not 0.0 <= d.dev_fraction < 1.0:
        raise ConfigError(f"data.dev_fraction={d.dev_fraction} must be in [0, 1) (or set data.dev)")
    if d.seq_len is not None and d.seq_len < 2:
        raise ConfigError(f"data.seq_len={d.seq_len} must be at least 2 (typically 512-4096)")
    for key, value in (("data.max_train_examples", d.max_train_examples),
                       ("data.max_dev_examples", d.max_dev_examples)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive (or unset for all)")
    if t.global_batch is None or t.global_batch <= 0:
        raise ConfigError(f"train.global_batch={t.global_batch} must be a positive number of examples")
    if t.micro_batch <= 0:
        raise ConfigError(f"train.micro_batch={t.micro_batch} must be positive")
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError("set exactly one of train.max_steps and train.epochs")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps={t.max_steps} must be positive")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs} must be positive")
    validate_common(cfg)
    if t.max_steps is not None and s.warmup_steps > t.max_steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} exceeds train.max_steps={t.max_steps}; "
                          f"lower it (e.g. {max(0, t.max_steps // 10)})")
    if (e.patience or e.keep_best) and e.batches and d.dev_fraction == 0 and not d.dev:
        raise ConfigError("early stopping and eval.keep_best need a dev split: set data.dev or data.dev_fraction "
                          "(or eval.keep_best=false)")
    known = MAXIMIZE + MINIMIZE
    if e.metric is not None and e.metric not in known:
        raise ConfigError(f"eval.metric={e.metric} is not one of {', '.join(known)}")
    if e.metric in MAXIMIZE and e.metric not in cfg.spec.metrics:
        modes = " and ".join(m for m, spec in MODE_SPECS.items() if e.metric in spec.metrics)
        raise ConfigError(f"eval.metric={e.metric} is measured for finetune.mode={modes} only; use val_loss")
    dp = cfg.dpo
    if dp.beta <= 0:
        raise ConfigError(f"dpo.beta={dp.beta} must be positive (typical: 0.1 for sigmoid/ipo, 2.0 for simpo)")
    if not 0.0 <= dp.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={dp.label_smoothing} must be in [0, 0.5)")
    if dp.lambda_ < 0:
        raise ConfigError(f"dpo.lambda={dp.lambda_} must be non-negative (typical: 0.1)")
    if dp.max_prompt_len is not None and not 1 <= dp.max_prompt_len < d.seq_len:
        raise ConfigError(f"dpo.max_prompt_len={dp.max_prompt_len} must be in [1, data.seq_len={d.seq_len})")
    if dp.precompute_ref and dp.loss in ("simpo", "orpo"):
        raise ConfigError(f"dpo.precompute_ref applies to losses with a reference model; dpo.loss={dp.loss} "
                          "is reference-free: drop dpo.precompute_ref")
    if cfg.mode == "grpo":
        validate_grpo(cfg)
    if cfg.uses_lora:
        if cfg.lora.alpha <= 0:
            raise ConfigError(f"lora.alpha={cfg.lora.alpha} must be positive (typical: 2 × lora.rank)")
        cfg.lora_config().target_names()  # rank, dropout and target names, with their own messages
    if not 0.0 <= cfg.classify.dropout < 1.0:
        raise ConfigError(f"classify.dropout={cfg.classify.dropout} must be in [0, 1)")
    if cfg.classify.labels is not None and len(set(cfg.classify.labels)) < 2:
        raise ConfigError(f"classify.labels={cfg.classify.labels} must list at least 2 distinct labels")


def validate_grpo(cfg: FinetuneConfig) -> None:
    g, t = cfg.grpo, cfg.train
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations={g.num_generations} must be at least 2 (advantages are relative "
                          "to the group; typical: 8)")
    if t.global_batch % g.num_generations:
        raise ConfigError(f"train.global_batch={t.global_batch} counts completions and must be a multiple of "
                          f"grpo.num_generations={g.num_generations}")
    if g.max_completion_length < 1:
        raise ConfigError(f"grpo.max_completion_length={g.max_completion_length} must be positive")
    if not g.temperature > 0:
        raise ConfigError(f"grpo.temperature={g.temperature} must be positive (rollouts are sampled)")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"grpo.top_p={g.top_p} must be in (0, 1]")
    if g.beta < 0:
        raise ConfigError(f"grpo.beta={g.beta} must be >= 0 (0 = no KL penalty, typical 0.04)")
    if not 0 < g.epsilon < 1 or (g.epsilon_high is not None and not g.epsilon_high > 0):
        raise ConfigError(f"grpo.epsilon={g.epsilon} must be in (0, 1) and grpo.epsilon_high positive")
    if g.num_iterations < 1:
        raise ConfigError(f"grpo.num_iterations={g.num_iterations} must be at least 1")
    if g.sample_interval < 0 or g.eval_max_prompts < 0:
        raise ConfigError("grpo.sample_interval and grpo.eval_max_prompts must be >= 0")
    for i, r in enumerate(g.rewards):
        if not math.isfinite(r.weight):
            raise ConfigError(f"grpo.rewards[{i}].weight={r.weight} must be a finite number")
        if r.name == "format" and not r.pattern:
            raise ConfigError(f"grpo.rewards[{i}]: name=format needs pattern: REGEX")
        if r.name == "python" and not r.function:
            raise ConfigError(f"grpo.rewards[{i}]: name=python needs function: FILE.py:NAME")
        if r.target_tokens < 0 or r.tolerance < 0:
            raise ConfigError(f"grpo.rewards[{i}]: target_tokens and tolerance must be >= 0")


SEQ_LEN_CAP = 2048  # the default data.seq_len: the model's context, capped (memory grows with the length)


def model_context(model_dir: str) -> int | None:
    """``max_seq_len`` of a model dir, read from its metadata without importing torch (None when the
    dir is not readable: the run's own model-dir check names the problem)."""
    try:
        return read_metadata(model_dir).max_seq_len
    except UserError:
        return None


def resolve(cfg: FinetuneConfig, path: str | None) -> None:
    """Fill the defaults that depend on other keys (run dir, eval metric and its direction, data.seq_len)."""
    if cfg.data.seq_len is None:
        context = model_context(cfg.model.path)
        cfg.data.seq_len = None if context is None else min(context, SEQ_LEN_CAP)
    if cfg.run.dir is None:
        stem = Path(path).stem if path else "finetune"
        cfg.run.dir = str(Path("runs") / stem)
    if cfg.run.name is None:
        cfg.run.name = Path(cfg.run.dir).name
    if cfg.eval.metric is None:
        cfg.eval.metric = cfg.spec.default_metric
    if cfg.eval.metric_mode == "auto":
        cfg.eval.metric_mode = "max" if cfg.eval.metric in MAXIMIZE else "min"


def config_from_dict(data: dict[str, Any], path: str | None = None) -> FinetuneConfig:
    data = dict(data)
    if isinstance(data.get("dpo"), dict) and "lambda" in data["dpo"]:  # `lambda` is a Python keyword
        data["dpo"] = {**data["dpo"], "lambda_": data["dpo"]["lambda"]}
        del data["dpo"]["lambda"]
    model = ModelSource.from_yaml(data.pop("model", None))
    cfg = from_dict(FinetuneConfig, data)
    cfg.model = model
    resolve(cfg, path)
    validate(cfg)
    return cfg


def load_config(path: str | None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
                ) -> FinetuneConfig:
    """YAML file or packaged recipe (or ``base``) + ``section.key=value`` overrides -> a validated FinetuneConfig."""
    data = load_config_source(path) if path else dict(base or {})
    data = apply_overrides(data, overrides)
    return config_from_dict(data, path)


def config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The resolved config as plain data (``model.from`` spelled as in YAML)."""
    out = to_dict(cfg)
    out["model"] = cfg.model.to_yaml()
    out["dpo"]["lambda"] = out["dpo"].pop("lambda_")
    return out


__all__ = [
    "MODES",
    "ClassifySection",
    "DpoSection",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneEvalConfig",
    "FinetuneSection",
    "FinetuneTrainConfig",
    "GrpoSection",
    "LoraSection",
    "ModelSource",
    "RewardSpec",
    "TrainFile",
    "config_dict",
    "config_from_dict",
    "load_config",
    "validate",
]
