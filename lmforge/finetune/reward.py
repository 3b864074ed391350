"""Reward modelling (``finetune.mode: reward``): a scalar head (`lmforge.models.reward.RewardModel`) on the
backbone, trained with the Bradley–Terry pairwise loss on the same pairs as DPO:

    loss = −log σ(r(x, y_chosen) − r(x, y_rejected))      (summed over pairs; the Trainer divides by pairs)

Each side is the chat-rendered prompt followed by the reply and its EOS (the encoding of
`lmforge.data.preference_pairs`, same truncation rules); the score is read at the last real token.
Every evaluation reports ``val_loss``, ``accuracy`` (percent of dev pairs whose chosen reply scores
higher) and ``margin`` (mean chosen − rejected score).
"""

from __future__ import annotations

import torch

from lmforge.eval.pairwise import bradley_terry, collate_sides, pair_scores, pairwise_metrics


def reward_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = pair_scores(model, batch)
    return bradley_terry(c, r).sum(), torch.tensor(c.numel())


class RewardEvaluator:
    """``eval_fn``: every rank scores the whole (capped) dev split in the same batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], device):
        self.batches, self.device = batches, device

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        from lmforge.train.batches import to_device

        cs, rs = [], []
        for b in self.batches:
            c, r = pair_scores(model, to_device(b, self.device))
            cs.append(c.cpu())
            rs.append(r.cpu())
        return pairwise_metrics(torch.cat(cs), torch.cat(rs)) if cs else {}


def prepare_reward(cfg, tokenizer, mcfg, world, device):
    from lmforge.data.preference_pairs import PairBatches
    from lmforge.finetune.preference import prepare_pairs
    from lmforge.finetune.recipes import _pad_id

    prepared, train_ds, dev_ds = prepare_pairs(cfg, tokenizer, mcfg, world, device)
    pad_id = _pad_id(tokenizer)
    prepared.batches = PairBatches(train_ds, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                                   seed=cfg.train.seed, pad_id=pad_id, collate=collate_sides)
    if dev_ds is not None:
        bs = cfg.eval.batch_size or cfg.train.micro_batch
        order = sorted(range(len(dev_ds)), key=lambda i: (-len(dev_ds.prompt[i]), i))
        batches = [collate_sides(dev_ds, order[s:s + bs], pad_id) for s in range(0, len(order), bs)]
        prepared.eval_fn = RewardEvaluator(batches[: cfg.eval.batches], device)
    return prepared


__all__ = ["RewardEvaluator", "bradley_terry", "collate_sides", "pair_scores", "pairwise_metrics", "prepare_reward",
           "reward_loss"]
