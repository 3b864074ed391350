"""Reward modelling (``finetune.mode: reward``): a scalar head (`lmforge.models.reward.RewardModel`) on the
backbone, trained with the Bradley–Terry pairwise loss on the same pairs as DPO:

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected))      (summed over pairs; the Trainer divides by pairs)

Each side is the chat-rendered prompt followed by the reply and its EOS (the encoding of
`lmforge.data.preference_pairs`, same truncation rules); the score is read at the last real token.
Every evaluation reports ``val_loss``, ``accuracy`` (percent of dev pairs whose chosen reply scores
higher) and ``margin`` (mean chosen − rejected score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.reward_dir import save_reward_dir
from lmforge.data.preference_pairs import PairBatches
from lmforge.eval.pairwise import bradley_terry, collate_sides, pair_scores, pairwise_metrics
from lmforge.models.reward import RewardModel
from lmforge.tasks.base import RunResult
from lmforge.tasks.preference import PairsTask
from lmforge.train.batches import to_device


def reward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = pair_scores(model, batch)
    return bradley_terry(c, r).sum(), torch.tensor(c.numel())


class RewardEvaluator:
    """``eval_fn``: every rank scores the whole (capped) dev split in the same batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], device):
        self.batches, self.device = batches, device

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        cs, rs = [], []
        for b in self.batches:
            c, r = pair_scores(model, to_device(b, self.device))
            cs.append(c.cpu())
            rs.append(r.cpu())
        return pairwise_metrics(torch.cat(cs), torch.cat(rs)) if cs else {}


class RewardTask(PairsTask):
    """``finetune.mode: reward`` (full, or LoRA + head with ``classify.method: lora``)."""

    name = "reward"
    needs_lm_head = False
    lora_trainable = ("score.",)  # the head trains beside the adapters

    def what(self) -> str:
        return f"reward model ({self.cfg.classify.method})"

    def read_data(self, world, device) -> None:
        super().read_data(world, device)
        cfg, train_ds, dev_ds, pad = self.cfg, self.train_ds, self.dev_ds, self.pad
        self.batches = PairBatches(train_ds, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                                   seed=cfg.train.seed, pad_id=pad, collate=collate_sides)
        if dev_ds is not None:
            bs = cfg.eval.batch_size or cfg.train.micro_batch
            order = sorted(range(len(dev_ds)), key=lambda i: (-len(dev_ds.prompt[i]), i))
            batches = [collate_sides(dev_ds, order[s:s + bs], pad) for s in range(0, len(order), bs)]
            self._eval = RewardEvaluator(batches[: cfg.eval.batches], device)

    def task_fields(self) -> dict[str, Any]:
        return {**self.chat_fields(), "classify.pooling": "last", "classify.method": self.cfg.classify.method}

    def wrap(self, backbone, training: bool = True):
        return RewardModel(backbone, self.cfg.classify.dropout) if training else RewardModel(backbone)

    def loss(self, model):
        return reward_loss

    def adapter_meta(self) -> dict[str, Any]:
        return {"task": "reward"}

    def save_dir(self, model, out: Path, weights_step: int) -> None:
        save_reward_dir(model, out, tokenizer_dir=self.cfg.model.path, extra=self.identity())

    @classmethod
    def metrics_text(cls, val: dict[str, float], res: RunResult) -> list[str]:
        if "margin" in val:
            return [f"dev pairwise accuracy {val['accuracy']:.1f}%, mean margin {val['margin']:.4g}"]
        return super().metrics_text(val, res)


__all__ = ["RewardEvaluator", "RewardTask", "bradley_terry", "collate_sides", "pair_scores", "pairwise_metrics",
           "reward_loss"]
