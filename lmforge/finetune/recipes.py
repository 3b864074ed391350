"""The fine-tuning recipes: config -> (checks) -> model dir + data -> `Trainer.fit()` -> RUN/model.

    sft       full fine-tuning on instruction data; the loss covers assistant tokens (and the EOS ending
              each reply) only
    lora      the same with LoRA adapters: only adapters train, checkpoints hold only them (and their
              optimizer state); RUN/model gets the merged weights, RUN/adapter the adapters + base reference
    classify  a `SequenceClassifier` head on the backbone (full, or LoRA + head); accuracy and macro-F1 on
              the dev split at every evaluation
    dpo       preference tuning (sigmoid/DPO, IPO, SimPO, ORPO) on chosen/rejected pairs against the frozen
              starting model (lmforge/finetune/preference.py)
    reward    a scalar-head reward model trained with the Bradley-Terry loss on the same pairs
              (lmforge/finetune/reward.py)

All of them share pretraining's Trainer (accumulation, schedules, early stopping, DCP checkpoints, exact
resume, metrics). With ``eval.keep_best`` the weights of the best evaluation are kept in RUN/best/ and
become RUN/model at the end.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, UserError
from lmforge.console import info
from lmforge.finetune.config import FinetuneConfig, config_dict
from lmforge.finetune.final_model import (
    BEST_DIR,
    export,
    lora_trainable_prefixes,
    save_adapter,
    save_best,
)
from lmforge.models.adapter_dir import load_adapter, model_fingerprint


# ================================================================================================
# Batches and loss for instruction tuning
# ================================================================================================
def sft_loss(model, batch: dict, *, chunk: int = 1024, z_loss: float = 0.0) -> tuple[Any, Any]:
    """Summed next-token cross-entropy on the labelled (assistant) positions; labels are already shifted.
    Computed in chunks of tokens from the final hidden states (`lmforge.train.loss`), like pretraining's
    (``train.loss_chunk_tokens``, ``train.z_loss``)."""
    from lmforge.train.batches import next_token_loss

    labels = batch["labels"]  # (B, T), -100 = no loss
    loss = next_token_loss(model, batch["tokens"], labels, positions=batch.get("positions"), mask=batch.get("mask"),
                           chunk=chunk, z_loss=z_loss)
    return loss, (labels != -100).sum()


def sft_batch_dict(b) -> dict[str, Any]:
    """`SFTBatch` -> the dict the Trainer splits into micro-batches (no mask for unpacked rows)."""
    out = {"tokens": b.tokens, "labels": b.labels, "positions": b.positions,
           "input_tokens": (b.doc_ids >= 0).sum(1)}  # real (non-padding) inputs per row: the throughput count
    if b.attention_mask is not None:
        out["mask"] = b.attention_mask
    return out


class SFTBatches:
    """`SFTBatchIterator` as a Trainer batch source (dict batches, same resumable state)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next_batch(self) -> dict[str, Any]:
        return sft_batch_dict(self.iterator.next_batch())

    def state_dict(self) -> dict[str, Any]:
        return self.iterator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iterator.load_state_dict(state)


# ================================================================================================
# Model dirs: loading, fingerprints, adapters
# ================================================================================================
def set_dropout(model, p: float) -> None:
    """Set the backbone's dropout (residual/embedding modules and attention probabilities) to ``p``."""
    from torch import nn

    model.cfg.dropout = p
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def load_base(cfg: FinetuneConfig, device, mcfg, world=None):
    """The model dir of ``model.from`` on ``device`` in fp32, with the fine-tuning dropout.

    Full fine-tuning in a job that shards parameters (FSDP2/TP, ``world`` given) builds on the meta device
    and each rank reads only its slices of the weights when the Trainer parallelizes the model
    (`lmforge.distributed.world.build_for_world`). LoRA and classification wrap the full model first.
    """
    from lmforge.models.model_dir import load_model_dir

    if world is not None and cfg.mode == "sft" and not cfg.uses_lora:
        from lmforge.distributed.world import build_for_world

        model = build_for_world(mcfg, world, device, model_dir=cfg.model.path)
    else:
        model = load_model_dir(cfg.model.path, device=device)
    if cfg.model.dropout is not None:
        set_dropout(model, cfg.model.dropout)
    return model


# ================================================================================================
# Data
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
    ``data.dev_fraction`` of ``data.train``; each capped by ``data.max_*_examples``."""
    train = read(d.train, d.max_train_examples)
    if d.dev:
        return train, read(d.dev, d.max_dev_examples)
    train, dev = split_dev(train, d.dev_fraction, seed)
    return train, _cap(dev, d.max_dev_examples)


def _check_ids(seqs: Sequence[Sequence[int]], vocab_size: int, what: str) -> None:
    top = max((max(s) for s in seqs if s), default=-1)
    if top >= vocab_size:
        raise UserError(f"{what} encodes to token id {top}, outside the model's vocabulary of {vocab_size}; "
                        "model.from must hold the tokenizer the model was trained with")


@dataclass
class Prepared:
    """What the data stage hands the trainer."""

    batches: Any
    val_batches: Any = None
    eval_fn: Any = None
    units_per_epoch: int = 0
    n_train: int = 0
    n_dev: int = 0
    labels: list[str] | None = None
    majority_baseline: float | None = None
    stats: dict[str, Any] | None = None
    template: str | None = None


def prepare_sft(cfg: FinetuneConfig, tokenizer, mcfg, world, device) -> Prepared:
    from lmforge.finetune.batching import SFTBatchIterator, collate_rows
    from lmforge.finetune.data import encode_examples, load_sft_examples
    from lmforge.finetune.eval_sample import eval_order
    from lmforge.tokenizer.chat_template import get_chat_template

    d = cfg.data
    template = get_chat_template(tokenizer, d.chat_template)
    train, dev = read_train_dev(lambda paths, cap: load_sft_examples(paths, d.format, d.columns, cap), d,
                                cfg.train.seed)
    train_ds = encode_examples(tokenizer, train, d.seq_len, template)
    _check_ids(train_ds.input_ids, mcfg.vocab_size, "data.train")
    pad_id = _pad_id(tokenizer)
    iterator = SFTBatchIterator(train_ds, cfg.global_batch_size, d.seq_len, mode=d.batching, rank=world.dp_rank,
                                world_size=world.dp_size, seed=cfg.train.seed, pad_id=pad_id)
    prepared = Prepared(SFTBatches(iterator), units_per_epoch=len(iterator.units), n_train=len(train_ds),
                        n_dev=len(dev), stats={"train": train_ds.stats}, template=template)
    if dev and cfg.eval.batches:
        dev_ds = encode_examples(tokenizer, dev, d.seq_len, template)
        _check_ids(dev_ds.input_ids, mcfg.vocab_size, "data.dev")
        prepared.stats["dev"] = dev_ds.stats
        bs = cfg.eval.batch_size or cfg.train.micro_batch
        # a capped dev set is a seeded sample (not the longest examples), the same at every evaluation
        order = eval_order([len(x) for x in dev_ds.input_ids], cfg.eval.batches * bs, cfg.train.seed)
        rows = [[i] for i in order]
        fixed = [sft_batch_dict(collate_rows(dev_ds, rows[s:s + bs], d.seq_len, pad_id, packed=False))
                 for s in range(0, len(rows), bs)]

        def val_batches():  # the whole set on every rank; the Trainer shares it out evenly
            return fixed

        prepared.val_batches = val_batches
    return prepared


def prepare_classify(cfg: FinetuneConfig, tokenizer, mcfg, world, device) -> Prepared:
    from lmforge.data.labelled import encode_labelled, label_list, load_labelled
    from lmforge.finetune.classify import DevEvaluator, LabelledBatches

    d = cfg.data

    def read(paths: list[str], cap: int | None) -> list:
        out: list = []
        for p in paths:
            out += load_labelled(p, d.text_field, d.label_field, None if cap is None else cap - len(out),
                                 d.delimiter)
            if cap is not None and len(out) >= cap:
                break
        return out

    train, dev = read_train_dev(read, d, cfg.train.seed)
    labels = list(cfg.classify.labels) if cfg.classify.labels else label_list(train)
    if len(labels) < 2:
        raise UserError(f"data.train has a single label {labels}; classification needs at least 2 "
                        "(check data.label_field)")
    for split, examples in (("data.train", train), ("data.dev", dev)):
        unknown = sorted({e.label for e in examples} - set(labels))
        if unknown:
            raise UserError(f"{split} has labels {unknown[:5]} outside classify.labels={labels}; add them or "
                            "fix data.label_field")
    ids, ys = encode_labelled(tokenizer, train, labels, d.seq_len)
    _check_ids(ids, mcfg.vocab_size, "data.train")
    pad_id = _pad_id(tokenizer)
    batches = LabelledBatches(ids, ys, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                              seed=cfg.train.seed, pad_id=pad_id)
    prepared = Prepared(batches, units_per_epoch=len(ids), n_train=len(ids), n_dev=len(dev), labels=labels)
    if dev and cfg.eval.batches:
        dev_ids, dev_ys = encode_labelled(tokenizer, dev, labels, d.seq_len)
        _check_ids(dev_ids, mcfg.vocab_size, "data.dev")
        evaluator = DevEvaluator(dev_ids, dev_ys, labels, cfg.eval.batch_size or cfg.train.micro_batch, pad_id,
                                 device, cfg.eval.batches, seed=cfg.train.seed)
        prepared.eval_fn = evaluator
        prepared.majority_baseline = evaluator.majority_baseline()
        prepared.n_dev = evaluator.n
    return prepared


def _pad_id(tokenizer) -> int:
    for name in ("pad_id", "eos_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def _data_fingerprint(paths: Sequence[str]) -> list[str]:
    return [f"{Path(p).name}:{Path(p).stat().st_size}" for p in paths]


# ================================================================================================
# The recipe
# ================================================================================================
@dataclass
class FinetuneResult:
    mode: str
    train: Any  # the Trainer's TrainResult
    model_dir: str | None
    adapter_dir: str | None
    weights_step: int | None
    trainable_params: int
    total_params: int
    n_train: int
    n_dev: int
    labels: list[str] | None = None
    majority_baseline: float | None = None

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)


def finetune(cfg: FinetuneConfig, config_path: str | None = None) -> FinetuneResult:
    """Run (or resume) fine-tuning per ``cfg``."""
    import torch

    from lmforge.distributed.world import barrier, setup_world
    from lmforge.finetune.classify import classify_loss
    from lmforge.models.classifier import SequenceClassifier, read_task
    from lmforge.models.lora import apply_lora, trainable_summary
    from lmforge.models.model_dir import read_config
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.config import grad_accum_steps
    from lmforge.train.resume import check_compatible, find_resume
    from lmforge.train.trainer import Trainer

    # ---- checks (no work yet) ----
    base_dir = Path(cfg.model.path)
    base_cfg = read_config(base_dir)  # "not a model dir" errors name the fix
    if read_task(base_dir).get("task") == "classify":
        raise UserError(f"model.from='{base_dir}' is a classifier; fine-tune from a language-model dir "
                        "(RUN/model of pretraining or an imported model)")
    if not any((base_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"model.from='{base_dir}' holds no tokenizer (tokenizer.json / tokenizer.model); "
                        "fine-tuning encodes text with the model's own tokenizer")
    if cfg.mode not in ("classify", "reward") and not base_cfg.lm_head:
        raise UserError(f"finetune.mode={cfg.mode} needs a causal LM with an LM head; '{base_dir}' has none "
                        "(an encoder): use finetune.mode=classify")
    if cfg.mode not in ("classify", "reward") and not base_cfg.causal:
        raise UserError(f"finetune.mode={cfg.mode} needs a causal LM; '{base_dir}' is an encoder: "
                        "use finetune.mode=classify")
    if cfg.data.seq_len > base_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={base_cfg.max_seq_len}; "
                          f"lower data.seq_len")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world, device = setup_world(cfg.train.device, cfg.parallel)
    grad_accum_steps(cfg.global_batch_size, cfg.train.micro_batch, world.dp_size)
    tokenizer = load_tokenizer(base_dir)
    mcfg = replace(base_cfg, dropout=cfg.model.dropout) if cfg.model.dropout is not None else base_cfg
    prepare = prepare_classify if cfg.mode == "classify" else prepare_sft
    if cfg.mode in ("dpo", "reward"):  # preference pairs (lmforge/finetune/preference*.py, reward.py)
        from lmforge.finetune.preference import prepare_dpo
        from lmforge.finetune.reward import prepare_reward

        prepare = prepare_dpo if cfg.mode == "dpo" else prepare_reward
    data = prepare(cfg, tokenizer, mcfg, world, device)
    total_steps = cfg.steps_for(data.units_per_epoch)
    if cfg.schedule.warmup_steps > total_steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds the run's {total_steps} "
                          f"steps; lower it (e.g. {max(0, total_steps // 10)})")
    run_dir = Path(cfg.run.dir)
    base_fp = model_fingerprint(base_dir)
    fields: dict[str, Any] = {"finetune.mode": cfg.mode, "model.base": base_fp,
                              "data.seq_len": cfg.data.seq_len, "data.format": cfg.data.format,
                              "data.columns": dict(cfg.data.columns), "data.train": _data_fingerprint(cfg.data.train)}
    if cfg.mode == "classify":
        fields.update({"classify.labels": data.labels, "classify.pooling": cfg.classify.pooling,
                       "classify.method": cfg.classify.method})
    else:
        fields.update({"data.batching": cfg.data.batching,
                       "chat_template": hashlib.sha256((data.template or "").encode()).hexdigest()[:16]})
    if cfg.mode == "dpo":
        from lmforge.finetune.preference import math_fields

        fields.update(math_fields(cfg))
    if cfg.mode == "reward":
        fields.update({"classify.pooling": "last", "classify.method": cfg.classify.method})
    if cfg.uses_lora:
        fields.update({"lora.rank": cfg.lora.rank, "lora.alpha": cfg.lora.alpha,
                       "lora.targets": sorted(cfg.lora_config().target_names())})
    resume_from = find_resume(run_dir, cfg.train.resume)
    resume_notes = [] if resume_from is None else check_compatible(resume_from, fields, cfg.checkpoint.allow_mismatch)

    # ---- model ----
    torch.manual_seed(cfg.train.seed)  # the head's and the adapters' initialization
    model = load_base(cfg, device, mcfg, world)
    if cfg.mode == "classify":
        model = SequenceClassifier(model, len(data.labels), cfg.classify.pooling, cfg.classify.dropout)
    if cfg.mode == "reward":
        from lmforge.models.reward import RewardModel

        model = RewardModel(model, cfg.classify.dropout)
    if cfg.uses_lora:
        counts = apply_lora(model, cfg.lora_config(), trainable=lora_trainable_prefixes(cfg))
    else:
        counts = trainable_summary(model)
    if world.is_main:
        what = {"sft": "full fine-tuning", "lora": "LoRA", "classify": f"classification ({cfg.classify.method})",
                "dpo": f"preference tuning ({'LoRA' if cfg.uses_lora else 'full'})",
                "reward": f"reward model ({cfg.classify.method})"}
        unit = "packed rows" if cfg.mode in ("sft", "lora") and cfg.data.batching == "pack" else "examples"
        unit = "pairs" if cfg.mode in ("dpo", "reward") else unit
        per_epoch = max(1, data.units_per_epoch // cfg.global_batch_size)
        info(f"finetune {cfg.mode}: {what[cfg.mode]} of {base_dir}; {counts['trainable']:,} of {counts['total']:,} "
             f"parameters trainable ({counts['trainable'] / max(1, counts['total']):.2%}); {data.n_train:,} train / "
             f"{data.n_dev:,} dev examples; {data.units_per_epoch:,} {unit} -> {per_epoch:,} steps/epoch, "
             f"{total_steps:,} steps on {device}; run dir {run_dir}")
        if data.labels:
            base = f", majority-class baseline {data.majority_baseline:.1f}% on dev" \
                if data.majority_baseline is not None else ""
            info(f"labels {data.labels}{base}")
        if resume_from is None and (run_dir / BEST_DIR).exists():
            shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)  # a fresh run: no best from an earlier attempt
    barrier()

    trainer_cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, save_model=False))  # the recipe exports
    resolved = config_dict(cfg)
    on_best = (lambda tr: save_best(tr, run_dir)) if cfg.eval.keep_best else None
    loss_fn = classify_loss if cfg.mode == "classify" else functools.partial(
        sft_loss, chunk=cfg.train.loss_chunk_tokens, z_loss=cfg.train.z_loss)
    if cfg.mode == "dpo":  # builds the reference (frozen copy / precomputed log-probs) and the batch source
        from lmforge.finetune.preference import dpo_objective

        loss_fn = dpo_objective(cfg, model, data, tokenizer, world, device, fields)
    if cfg.mode == "reward":
        from lmforge.finetune.reward import reward_loss

        loss_fn = reward_loss
    flops = None if cfg.mode in ("classify", "dpo", "reward") else mcfg.flops_per_token(cfg.data.seq_len)
    trainer = Trainer(trainer_cfg, model, data.batches, data.val_batches, loss_fn, total_steps=total_steps,
                      world=world, device=device, config_dict=resolved, math_fields=fields, flops_per_token=flops,
                      resume_from=resume_from, resume_notes=resume_notes, eval_fn=data.eval_fn, on_best=on_best,
                      finish_tracking=False)  # trackers get the exported dirs below
    result = trainer.fit()
    model_dir = adapter_dir = weights_step = None
    if cfg.checkpoint.save_model and not result.exit_code:  # a stopped run exports nothing
        model_dir, adapter_dir, weights_step = export(trainer, result, cfg, base_cfg, data.labels, data.template,
                                                      base_fp)
        result.model_dir = model_dir
    trainer.trackers.finish_run(result.stop_reason, model_dir, adapter_dir)  # log.mlflow / log.wandb
    world.close()  # the run ended: a process group lmforge created is destroyed at exit
    return FinetuneResult(cfg.mode, result, model_dir, adapter_dir, weights_step, counts["trainable"],
                          counts["total"], data.n_train, data.n_dev, data.labels, data.majority_baseline)


def summary(res: FinetuneResult) -> tuple[str, dict[str, Any]]:
    """The one-line CLI summary and the --json payload."""
    from lmforge.train.metrics import format_duration

    r = res.train
    val = r.val or {}
    unit = {"classify": "examples", "dpo": "pairs", "reward": "pairs"}.get(res.mode)
    seen = f"{r.loss_tokens:,} {unit}" if unit else f"{r.tokens:,} tokens"  # loss_tokens counts what the loss sums
    reason = r.signal if r.stop_reason == "signal" and r.signal else r.stop_reason
    parts = [f"{reason.replace('_', ' ')} at step {r.step:,} ({seen}) in {format_duration(r.elapsed_s)}"]
    if r.final_loss is not None and math.isfinite(r.final_loss):
        parts.append(f"loss {r.final_loss:.4f}")
    if "accuracy" in val and "macro_f1" in val:
        base = f" (majority {res.majority_baseline:.1f}%)" if res.majority_baseline is not None else ""
        parts.append(f"dev accuracy {val['accuracy']:.1f}%{base}, macro-F1 {val['macro_f1']:.1f}")
    elif "rewards/accuracies" in val:
        parts.append(f"dev rewards/accuracies {val['rewards/accuracies']:.3f}, rewards/margins "
                     f"{val['rewards/margins']:.4g}, val loss {val['val_loss']:.4f}")
    elif "margin" in val:
        parts.append(f"dev pairwise accuracy {val['accuracy']:.1f}%, mean margin {val['margin']:.4g}")
    elif "val_loss" in val:
        parts.append(f"val loss {val['val_loss']:.4f}")
    if r.best_step is not None and r.best_value is not None:
        parts.append(f"best {r.best_metric} {r.best_value:.4g} at step {r.best_step:,}")
    parts.append(f"{res.trainable_params:,} of {res.total_params:,} params trained ({res.trainable_fraction:.2%})")
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


__all__ = [
    "FinetuneResult",
    "SFTBatches",
    "finetune",
    "load_adapter",
    "model_fingerprint",
    "save_adapter",
    "sft_loss",
    "split_dev",
    "summary",
]
