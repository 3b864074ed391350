"""Pairwise evaluation of a reward model (``lmforge eval --task pairwise``): on preference pairs (the shapes
``finetune.mode: dpo`` / ``reward`` read), the share of pairs whose chosen reply scores higher than the
rejected one, and the mean score margin.
"""

from __future__ import annotations

import os

import torch

from lmforge.config import UserError


@torch.no_grad()
def score_pairs(model, data, batch_size: int, pad_id: int, device, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of the chosen and rejected side of every encoded pair, in order."""
    from lmforge.finetune.reward import collate_sides, pair_scores

    order = sorted(range(len(data)), key=lambda i: (-len(data.prompt[i]), i))
    chosen, rejected = torch.zeros(len(data), dtype=torch.float64), torch.zeros(len(data), dtype=torch.float64)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate_sides(data, idx, pad_id).items()}
        c, r = pair_scores(model, batch)
        chosen[idx], rejected[idx] = c.double().cpu(), r.double().cpu()
        if progress is not None:
            progress.update(len(idx))
    return chosen, rejected


def evaluate_pairwise(model_dir: str | os.PathLike, data_path: str | os.PathLike, device="cpu", dtype=None,
                      batch_size: int = 8, max_examples: int | None = None, chat_template: str | None = None,
                      progress=None) -> dict:
    from lmforge.finetune.chat_template import get_chat_template
    from lmforge.finetune.preference_data import encode_pairs, load_pairs
    from lmforge.finetune.reward import pairwise_metrics
    from lmforge.models.reward import is_reward_dir, load_reward_dir
    from lmforge.tokenizer import load_tokenizer

    if not is_reward_dir(model_dir):
        raise UserError(f"'{model_dir}' is not a reward model dir (config.json has no task: reward); --task pairwise "
                        "scores reward models trained with finetune.mode=reward")
    model = load_reward_dir(model_dir, device=device, dtype=dtype or torch.float32)
    tokenizer = load_tokenizer(model_dir)
    pairs = load_pairs(data_path, max_examples)
    data = encode_pairs(tokenizer, pairs, model.cfg.max_seq_len - 1, get_chat_template(tokenizer, chat_template))
    if progress is not None:
        progress.total = len(data)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    chosen, rejected = score_pairs(model, data, batch_size, pad, device, progress)
    metrics = pairwise_metrics(chosen, rejected)
    metrics.pop("val_loss")
    metrics.update(n=len(data), bt_loss=float(-torch.nn.functional.logsigmoid(chosen - rejected).mean()),
                   truncated=data.stats["prompt_truncated"] + data.stats["completion_truncated"],
                   dropped=data.stats["dropped"])
    predictions = [{"where": w, "chosen_score": float(c), "rejected_score": float(r)}
                   for w, c, r in zip(data.where, chosen, rejected)]
    return {"metrics": metrics, "predictions": predictions}


__all__ = ["evaluate_pairwise", "score_pairs"]
