"""Classification fine-tuning (``finetune.mode: classify``): a `SequenceClassifier` head on the backbone
(full, or LoRA + head with ``classify.method: lora``); a resumable batch source over labelled examples, the
loss (`lmforge.train.losses.classify_loss`), and the dev-set evaluation (accuracy and macro-F1 through
`lmforge.eval.classification`) at every evaluation. RUN/model is a classifier dir.

A batch is a dict: ``tokens`` (B, T) right-padded ids, ``lengths`` (B,) real lengths, ``labels`` (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.artifacts.classifier_dir import save_classifier_dir
from lmforge.config import UserError
from lmforge.data.epochs import EpochCursor, check_batch_layout
from lmforge.data.eval_sample import eval_order
from lmforge.data.labelled import encode_labelled, label_list, load_labelled
from lmforge.eval.classification import classification_scores
from lmforge.models.classifier import SequenceClassifier
from lmforge.tasks.base import RunResult
from lmforge.tasks.finetuning import FinetuneTask, check_ids, pad_id, read_train_dev
from lmforge.train.losses import classify_loss


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row (rounded up to ``multiple``) -> tokens (B, T), lengths (B,)."""
    longest = max(len(s) for s in seqs)
    T = -(-longest // multiple) * multiple
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long)


class LabelledBatches:
    """Deterministic, resumable batches of (text ids, label) for the Trainer.

    Every epoch reorders the examples with a generator seeded by ``(seed, epoch)``; a global batch is
    ``global_batch`` consecutive examples of that order and rank ``r`` takes its contiguous slice, so the
    global stream does not depend on the world size (as `SFTBatchIterator` and `ShardLoader` do). The
    last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, ids: Sequence[list[int]], labels: Sequence[int], global_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, pad_id: int = 0):
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} texts for {len(labels)} labels")
        check_batch_layout(len(ids), global_batch, world_size, "examples")
        self.ids, self.labels = list(ids), list(labels)
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.cursor = EpochCursor(len(self.ids), global_batch, rank=rank, world_size=world_size, seed=seed)

    @property
    def batches_per_epoch(self) -> int:
        return self.cursor.batches_per_epoch

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.cursor.next_slice()
        tokens, lengths = pad_batch([self.ids[i] for i in idx], self.pad_id)
        return {"tokens": tokens, "lengths": lengths,
                "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long)}

    def state_dict(self) -> dict[str, Any]:
        return {**self.cursor.state_dict(), "seed": self.seed, "global_batch": self.global_batch,
                "examples": len(self.ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"seed": self.seed, "global_batch": self.global_batch, "examples": len(self.ids)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"cannot resume the classification data stream: checkpoint has {key}="
                                f"{state.get(key)!r}, this run has {value!r}; resume with the same data, seed "
                                "and train.global_batch")
        self.cursor.load_state_dict(state)


class DevEvaluator:
    """``eval_fn`` for the Trainer: loss, accuracy and macro-F1 (percent) on the dev split.

    Every rank scores the whole (capped) dev split in the same batches, so the metrics agree across
    ranks without communication and sharded models run their collectives in step. A cap
    (``max_batches``) keeps a seeded sample of the dev split, the same at every evaluation.
    """

    def __init__(self, ids: Sequence[list[int]], labels: Sequence[int], label_names: Sequence[str],
                 batch_size: int, pad_id: int, device: torch.device, max_batches: int | None = None,
                 seed: int = 0):
        # capped: a seeded sample independent of length (not the longest); similar lengths share a batch
        order = eval_order([len(x) for x in ids], max_batches * batch_size if max_batches else None, seed)
        self.batches = []
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            tokens, lengths = pad_batch([ids[i] for i in idx], pad_id)
            self.batches.append((tokens, lengths, torch.tensor([labels[i] for i in idx], dtype=torch.long)))
        self.label_names = list(label_names)
        self.device = device
        self.n = sum(b[2].numel() for b in self.batches)

    def majority_baseline(self) -> float:
        """Accuracy (percent) of always answering the dev split's most frequent label."""
        counts = torch.bincount(torch.cat([b[2] for b in self.batches]), minlength=len(self.label_names))
        return 100.0 * float(counts.max()) / max(1, self.n)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        golds, preds = [], []
        loss = 0.0
        for tokens, lengths, labels in self.batches:
            logits = model(tokens.to(self.device), lengths.to(self.device)).float()
            loss += float(F.cross_entropy(logits, labels.to(self.device), reduction="sum"))
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        names = self.label_names
        scores = classification_scores([names[g] for g in golds], [names[p] for p in preds], names)
        return {"val_loss": loss / max(1, self.n), "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


class ClassifyTask(FinetuneTask):
    """``finetune.mode: classify``."""

    name = "classify"
    unit = "examples"
    needs_lm_head = False
    lora_trainable = ("score.",)  # the head trains beside the adapters

    def what(self) -> str:
        return f"classification ({self.cfg.classify.method})"

    def read_data(self, world, device) -> None:
        cfg, d = self.cfg, self.cfg.data

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
        ids, ys = encode_labelled(self.tokenizer, train, labels, d.seq_len)
        check_ids(ids, self.mcfg.vocab_size, "data.train")
        pad = pad_id(self.tokenizer)
        self.batches = LabelledBatches(ids, ys, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                                       seed=cfg.train.seed, pad_id=pad)
        self.units_per_epoch, self.n_train, self.n_dev, self.labels = len(ids), len(ids), len(dev), labels
        if dev and cfg.eval.batches:
            dev_ids, dev_ys = encode_labelled(self.tokenizer, dev, labels, d.seq_len)
            check_ids(dev_ids, self.mcfg.vocab_size, "data.dev")
            evaluator = DevEvaluator(dev_ids, dev_ys, labels, cfg.eval.batch_size or cfg.train.micro_batch, pad,
                                     device, cfg.eval.batches, seed=cfg.train.seed)
            self._eval = evaluator
            self.majority_baseline = evaluator.majority_baseline()
            self.n_dev = evaluator.n

    def task_fields(self) -> dict[str, Any]:
        c = self.cfg.classify
        return {"classify.labels": self.labels, "classify.pooling": c.pooling, "classify.method": c.method}

    def wrap(self, backbone, training: bool = True):
        c = self.cfg.classify
        if training:
            return SequenceClassifier(backbone, len(self.labels), c.pooling, c.dropout)
        return SequenceClassifier(backbone, len(self.labels), c.pooling)

    def loss(self, model):
        return classify_loss

    def adapter_meta(self) -> dict[str, Any]:
        return {"task": "classify", "labels": list(self.labels or []), "pooling": self.cfg.classify.pooling}

    def save_dir(self, model, out: Path, weights_step: int) -> None:
        # max_tokens: texts were cut to data.seq_len in training and its dev evaluation; `lmforge eval`
        # cuts them the same way, so its accuracy on the dev split equals the reported one
        save_classifier_dir(model, out, self.labels, tokenizer_dir=self.cfg.model.path,
                            extra={**self.identity(), "max_tokens": self.cfg.data.seq_len})

    @classmethod
    def metrics_text(cls, val: dict[str, float], res: RunResult) -> list[str]:
        if "accuracy" in val and "macro_f1" in val:
            base = f" (majority {res.majority_baseline:.1f}%)" if res.majority_baseline is not None else ""
            return [f"dev accuracy {val['accuracy']:.1f}%{base}, macro-F1 {val['macro_f1']:.1f}"]
        return super().metrics_text(val, res)


__all__ = ["ClassifyTask", "DevEvaluator", "LabelledBatches", "classify_loss", "pad_batch"]
