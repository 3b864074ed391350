"""What every fine-tuning task shares: starting from a model dir (``model.from``), reading a train/dev split,
LoRA as an option of the model (applied here, for any task), the settings a resume must match, and the
end of the run (RUN/best, RUN/model, RUN/adapter through `lmforge.tasks.outputs`).

A fine-tuning task subclasses `FinetuneTask` and fills in its data (``prepare``), its head (``wrap``), its
loss, its metrics, what it adds to the math fields, how RUN/model is written (``save_dir``) and the
metrics part of its summary line.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge.artifacts.adapter_dir import model_fingerprint
from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import load_model_dir, read_config, save_model_dir
from lmforge.config import ConfigError, UserError
from lmforge.console import info
from lmforge.data.epochs import weight_examples
from lmforge.models.lora import apply_lora, trainable_summary
from lmforge.models.transformer import Transformer
from lmforge.tasks.base import Outputs, RunResult, Task, final_loss, stopped_at
from lmforge.tasks.config import FinetuneConfig, config_dict
from lmforge.tasks.outputs import BEST_DIR, export, save_best
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.identity import tokenizer_dir_hash
from lmforge.train.trainer import Job


# ================================================================================================
# Data helpers
# ================================================================================================
def split_dev(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded ``fraction`` of the examples (at least one) as the dev split."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    k = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), k))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _cap(examples: list, n: int | None) -> list:
    return examples if n is None else examples[:n]


def read_train_dev(read: Callable[[Sequence[str], int | None], list], d, seed: int) -> tuple[list, list]:
    """(train, dev) records per the data section: ``data.dev`` when given, else a seeded
    ``data.dev_fraction`` of ``data.train``; each capped by ``data.max_*_examples``. A weighted ``data.train``
    (``{path, weight}`` entries) holds out the same dev examples, then up/down-samples each file's rest
    (`lmforge.data.epochs.weight_examples`)."""
    if d.weighted:
        return _read_weighted(read, d, seed)
    train = read(d.train, d.max_train_examples)
    if d.dev:
        return train, read(d.dev, d.max_dev_examples)
    train, dev = split_dev(train, d.dev_fraction, seed)
    return train, _cap(dev, d.max_dev_examples)


def _read_weighted(read: Callable[[Sequence[str], int | None], list], d, seed: int) -> tuple[list, list]:
    groups, left = [], d.max_train_examples
    for path, _ in d.train_files():
        groups.append(read([path], left) if left is None or left > 0 else [])
        left = None if left is None else left - len(groups[-1])
    if d.dev:
        dev = read(d.dev, d.max_dev_examples)
    else:  # the unweighted run's dev examples: the split runs over the files' examples in order
        tagged = [(g, e) for g, examples in enumerate(groups) for e in examples]
        kept, held = split_dev(tagged, d.dev_fraction, seed)
        groups = [[e for g2, e in kept if g2 == g] for g in range(len(groups))]
        dev = _cap([e for _, e in held], d.max_dev_examples)
    return weight_examples(groups, [w for _, w in d.train_files()], seed), dev


def check_ids(seqs: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    """Refuse token ids outside the model's vocabulary (a tokenizer that is not the model's)."""
    top = max((max(s) for s in seqs if s), default=-1)
    if top >= vocab_size:
        raise UserError(f"{what} encodes to token id {top}, outside the model's vocabulary of {vocab_size}; "
                        "model.from must hold the tokenizer the model was trained with")


def pad_id(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def data_fingerprint(paths: Sequence[str]) -> list[str]:
    return [f"{Path(p).name}:{Path(p).stat().st_size}" for p in paths]


def set_dropout(model, p: float) -> None:
    """Set the backbone's dropout (residual/embedding modules and attention probabilities) to ``p``."""
    model.cfg.dropout = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


# ================================================================================================
# The shared fine-tuning task
# ================================================================================================
class FinetuneTask(Task):
    """A task that starts from the model dir ``model.from`` (see the module docstring)."""

    needs_lm_head: ClassVar[bool] = True  # a causal LM with an LM head (sft, dpo); False: any backbone
    lora_trainable: ClassVar[tuple[str, ...]] = ()  # modules that train beside the adapters (a head)
    unit = "examples"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.base_dir = Path(cfg.model.path)
        self.units_per_epoch = self.n_train = self.n_dev = 0
        self.labels: list[str] | None = None
        self.majority_baseline: float | None = None
        self.template: str | None = None
        self.stats: dict[str, Any] | None = None
        self.counts = {"trainable": 0, "total": 0}

    # ---- what a task says about itself ----
    def uses_lora(self) -> bool:
        """True when only LoRA adapters (and ``lora_trainable``) train: an option of the model, switched per
        mode in the config (`lmforge.tasks.config.ModeSpec.lora`) and applied here for every task."""
        return self.cfg.uses_lora

    def what(self) -> str:
        """How the first log line names the run (e.g. ``full fine-tuning``)."""
        raise NotImplementedError

    def unit_text(self) -> str:
        """What ``units_per_epoch`` counts (packed rows, examples, pairs)."""
        return self.unit

    def wrap(self, backbone: nn.Module, training: bool = True) -> nn.Module:
        """The trained structure around the backbone (a head); identity for an LM."""
        return backbone

    def task_fields(self) -> dict[str, Any]:
        """The task's settings that change its math (added to the shared ones)."""
        return {}

    def adapter_meta(self) -> dict[str, Any]:
        """The task's part of RUN/adapter's config (``task`` and a head's settings)."""
        return {"task": "lm"}

    def save_dir(self, model: nn.Module, out: Path, weights_step: int) -> None:
        """Write RUN/model from the consolidated (LoRA-merged) model."""
        raise NotImplementedError

    @classmethod
    def metrics_text(cls, val: dict[str, float], res: RunResult) -> list[str]:
        """The dev metrics part of the summary line."""
        return [f"val loss {val['val_loss']:.4f}"] if "val_loss" in val else []

    # ---- before any work ----
    def check(self) -> None:
        base_dir, cfg = self.base_dir, self.cfg
        self.base_cfg = read_config(base_dir)  # "not a model dir" errors name the fix
        if read_metadata(base_dir).task == "classify":
            raise UserError(f"model.from='{base_dir}' is a classifier; fine-tune from a language-model dir "
                            "(RUN/model of pretraining or an imported model)")
        if not any((base_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
            raise UserError(f"model.from='{base_dir}' holds no tokenizer (tokenizer.json / tokenizer.model); "
                            "fine-tuning encodes text with the model's own tokenizer")
        if self.needs_lm_head and not self.base_cfg.lm_head:
            raise UserError(f"finetune.mode={cfg.mode} needs a causal LM with an LM head; '{base_dir}' has none "
                            "(an encoder): use finetune.mode=classify")
        if self.needs_lm_head and not self.base_cfg.causal:
            raise UserError(f"finetune.mode={cfg.mode} needs a causal LM; '{base_dir}' is an encoder: "
                            "use finetune.mode=classify")
        if cfg.data.seq_len > self.base_cfg.max_seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                              f"{self.base_cfg.max_seq_len}; lower data.seq_len")
        self.base_fp = model_fingerprint(base_dir)

    # ---- data ----
    def prepare(self, world, device) -> None:
        cfg = self.cfg
        self.world, self.device = world, device
        self.tokenizer = load_tokenizer(self.base_dir)
        self.mcfg = (replace(self.base_cfg, dropout=cfg.model.dropout) if cfg.model.dropout is not None
                     else self.base_cfg)
        self.read_data(world, device)

    def read_data(self, world, device) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        steps = self.cfg.steps_for(self.units_per_epoch)
        if self.cfg.schedule.warmup_steps > steps:
            raise ConfigError(f"schedule.warmup_steps={self.cfg.schedule.warmup_steps} exceeds the run's {steps} "
                              f"steps; lower it (e.g. {max(0, steps // 10)})")
        return steps

    def math_fields(self) -> dict[str, Any]:
        cfg = self.cfg
        fields: dict[str, Any] = {"finetune.mode": cfg.mode, "model.base": self.base_fp,
                                  "data.seq_len": cfg.data.seq_len, "data.format": cfg.data.format,
                                  "data.columns": dict(cfg.data.columns),
                                  "data.train": data_fingerprint(cfg.data.train_paths())}
        if cfg.data.weighted:  # (only then: unweighted runs keep their checkpoints' fields)
            fields["data.train_weights"] = [w for _, w in cfg.data.train_files()]
        fields.update(self.task_fields())
        if self.uses_lora():
            fields.update({"lora.rank": cfg.lora.rank, "lora.alpha": cfg.lora.alpha,
                           "lora.targets": sorted(cfg.lora_config().target_names())})
        return fields

    def chat_fields(self) -> dict[str, Any]:
        """The math fields of a task that renders chats (sft, dpo, reward)."""
        return {"data.batching": self.cfg.data.batching,
                "chat_template": hashlib.sha256((self.template or "").encode()).hexdigest()[:16]}

    # ---- model ----
    def load_base(self, world, device) -> nn.Module:
        """The model dir of ``model.from`` on ``device`` in fp32, with the fine-tuning dropout."""
        model = load_model_dir(self.cfg.model.path, device=device)
        if self.cfg.model.dropout is not None:
            set_dropout(model, self.cfg.model.dropout)
        return model

    def build_model(self, world, device, resume_from) -> nn.Module:
        torch.manual_seed(self.cfg.train.seed)  # the head's and the adapters' initialization
        model = self.wrap(self.load_base(world, device))
        if self.uses_lora():
            self.counts = apply_lora(model, self.cfg.lora_config(), trainable=self.lora_trainable)
        else:
            self.counts = trainable_summary(model)
        return model

    def describe(self, model, world, device, total_steps, resume_from) -> None:
        cfg, counts = self.cfg, self.counts
        if world.is_main:
            per_epoch = max(1, self.units_per_epoch // cfg.global_batch_size)
            info(f"finetune {cfg.mode}: {self.what()} of {self.base_dir}; {counts['trainable']:,} of "
                 f"{counts['total']:,} parameters trainable ({counts['trainable'] / max(1, counts['total']):.2%}); "
                 f"{self.n_train:,} train / {self.n_dev:,} dev examples; {self.units_per_epoch:,} "
                 f"{self.unit_text()} -> {per_epoch:,} steps/epoch, {total_steps:,} steps on {device}; "
                 f"run dir {self.run_dir}")
            if self.labels:
                base = f", majority-class baseline {self.majority_baseline:.1f}% on dev" \
                    if self.majority_baseline is not None else ""
                info(f"labels {self.labels}{base}")
            if resume_from is None and (self.run_dir / BEST_DIR).exists():
                shutil.rmtree(self.run_dir / BEST_DIR, ignore_errors=True)  # a fresh run: no earlier best

    def trainer_cfg(self):
        """The config the Trainer runs with: the task exports RUN/model itself."""
        return replace(self.cfg, checkpoint=replace(self.cfg.checkpoint, save_model=False))

    def job(self, model, world, device, total_steps) -> Job:
        run_dir = self.run_dir
        on_best = (lambda tr: save_best(tr, run_dir)) if self.cfg.eval.keep_best else None
        loss = self.loss(model)  # first: DPO builds its reference (and its batches) from the starting model
        return Job(model, self.batches, total_steps, loss, self.val_batches(), self.eval_fn(), on_best,
                   math_fields=self.math_fields(), flops_per_token=self.flops_per_token(),
                   config_dict=config_dict(self.cfg), finish_tracking=False)

    # ---- the end ----
    def shell(self) -> nn.Module:
        """The trained structure on the meta device (no memory): backbone [+ head] [+ LoRA]."""
        with torch.device("meta"):
            model = self.wrap(Transformer(self.base_cfg), training=False)
        if self.uses_lora():
            apply_lora(model, self.cfg.lora_config(), trainable=self.lora_trainable)
        return model

    def identity(self) -> dict[str, Any]:
        """The tokenizer hash RUN/model records (checked against its copied tokenizer files on load)."""
        tok_hash = tokenizer_dir_hash(self.cfg.model.path)
        return {"tokenizer_hash": tok_hash} if tok_hash else {}

    def lm_extra(self, weights_step: int) -> dict[str, Any]:
        return {"trained_with": "lmforge finetune",
                "finetune": {"mode": self.cfg.mode, "base_model": self.cfg.model.path, "step": weights_step},
                **self.identity()}

    def save_lm_dir(self, model, out: Path, weights_step: int) -> None:
        save_model_dir(model, out, tokenizer_dir=self.cfg.model.path, extra=self.lm_extra(weights_step))

    def save_outputs(self, trainer, result) -> Outputs:
        if not (self.cfg.checkpoint.save_model and not result.exit_code):  # a stopped run exports nothing
            return Outputs()
        model_dir, adapter_dir, weights_step = export(trainer, result, self.cfg, self.shell, self.save_dir,
                                                      self.adapter_meta() if self.uses_lora() else None,
                                                      self.base_fp)
        result.model_dir = model_dir
        return Outputs(model_dir, adapter_dir, weights_step)

    def result(self, train, outputs: Outputs, model) -> RunResult:
        return RunResult(self.cfg.mode, train, outputs.model_dir, outputs.adapter_dir, outputs.weights_step,
                         self.counts["trainable"], self.counts["total"], self.n_train, self.n_dev, self.labels,
                         self.majority_baseline)

    @classmethod
    def summary(cls, res: RunResult) -> tuple[str, dict[str, Any]]:
        """The one-line CLI summary and the --json payload."""
        r = res.train
        val = r.val or {}
        # loss_tokens counts what the loss sums
        seen = f"{r.tokens:,} tokens" if cls.unit == "tokens" else f"{r.loss_tokens:,} {cls.unit}"
        parts = [stopped_at(r, seen), *final_loss(r), *cls.metrics_text(val, res)]
        if r.best_step is not None and r.best_value is not None:
            parts.append(f"best {r.best_metric} {r.best_value:.4g} at step {r.best_step:,}")
        parts.append(f"{res.trainable_params:,} of {res.total_params:,} params trained "
                     f"({res.trainable_fraction:.2%})")
        line = f"finetune {res.mode}: " + ", ".join(parts)
        if res.model_dir:
            line += f"; model in {res.model_dir}"
            if res.weights_step is not None and res.weights_step != r.step:
                line += f" (step {res.weights_step})"
        payload = {"mode": res.mode, **{k: v for k, v in vars(r).items()}, "model_dir": res.model_dir,
                   "adapter_dir": res.adapter_dir, "weights_step": res.weights_step,
                   "trainable_params": res.trainable_params, "total_params": res.total_params,
                   "trainable_fraction": res.trainable_fraction, "train_examples": res.n_train,
                   "dev_examples": res.n_dev, "labels": res.labels, "majority_baseline": res.majority_baseline}
        return line, payload


__all__ = ["FinetuneTask", "check_ids", "data_fingerprint", "pad_id",
           "read_train_dev", "set_dropout", "split_dev"]
