"""Classification fine-tuning pieces: a resumable batch source over labelled examples, the loss, and
the dev-set evaluation (accuracy and macro-F1 through `lmforge.eval.classification`).

A batch is a dict: ``tokens`` (B, T) right-padded ids, ``lengths`` (B,) real lengths, ``labels`` (B,).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import UserError
from lmforge.data.epochs import EpochCursor, check_batch_layout


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


def classify_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch's examples, and how many there are."""
    logits = model(batch["tokens"], batch["lengths"])  # (B, labels)
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss, torch.tensor(batch["labels"].numel())  # loss "tokens" = examples; inputs = lengths.sum()


class DevEvaluator:
    """``eval_fn`` for the Trainer: loss, accuracy and macro-F1 (percent) on the dev split.

    Every rank scores the whole (capped) dev split in the same batches, so the metrics agree across
    ranks without communication and sharded models run their collectives in step. A cap
    (``max_batches``) keeps a seeded sample of the dev split, the same at every evaluation.
    """

    def __init__(self, ids: Sequence[list[int]], labels: Sequence[int], label_names: Sequence[str],
                 batch_size: int, pad_id: int, device: torch.device, max_batches: int | None = None,
                 seed: int = 0):
        from lmforge.finetune.eval_sample import eval_order

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
        from lmforge.eval.classification import classification_scores

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


__all__ = ["DevEvaluator", "LabelledBatches", "classify_loss", "pad_batch"]
