"""Pairwise evaluation of a reward model (``lmforge eval --task pairwise``): on preference pairs (the shapes
``finetune.mode: dpo`` / ``reward`` read), the share of pairs whose chosen reply scores higher than the
rejected one, and the mean score margin. Also the scoring pieces the reward recipe trains with: batches of
both sides, one forward over them, and the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.artifacts.reward_dir import is_reward_dir, load_reward_dir
from lmforge.config import UserError
from lmforge.data.preference_pairs import encode_pairs, load_pairs
from lmforge.tokenizer.chat_template import get_chat_template
from lmforge.tokenizer.core import load_tokenizer


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, multiple: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row (rounded up to ``multiple``) -> tokens (B, T), lengths (B,)."""
    T = -(-max(len(s) for s in seqs) // multiple) * multiple
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def collate_sides(data, idx: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """``chosen_tokens``/``rejected_tokens`` (B, T) right-padded full sequences, their ``*_lengths``,
    ``index`` and ``input_tokens`` (B,), both sides' real tokens per pair."""
    ct, cl = _pad([data.prompt[i] + data.chosen[i] for i in idx], pad_id)
    rt, rl = _pad([data.prompt[i] + data.rejected[i] for i in idx], pad_id)
    return {"chosen_tokens": ct, "chosen_lengths": cl, "rejected_tokens": rt, "rejected_lengths": rl,
            "index": torch.tensor(list(idx), dtype=torch.long),
            "input_tokens": cl + rl}  # real tokens of both sides: what the Trainer counts as processed


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected sides, (B,) each, from one forward over both."""
    ct, rt = batch["chosen_tokens"], batch["rejected_tokens"]
    T = max(ct.size(1), rt.size(1))
    tokens = torch.cat([F.pad(ct, (0, T - ct.size(1))), F.pad(rt, (0, T - rt.size(1)))])
    scores = model(tokens, torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])).float()
    return scores[:ct.size(0)], scores[ct.size(0):]


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_c − r_r)."""
    return -F.logsigmoid(chosen - rejected)


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    margins = (chosen - rejected).double()
    return {"val_loss": float(bradley_terry(chosen.double(), rejected.double()).mean()),
            "accuracy": 100.0 * float((margins > 0).double().mean()), "margin": float(margins.mean())}



@torch.no_grad()
def score_pairs(model, data, batch_size: int, pad_id: int, device, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of the chosen and rejected side of every encoded pair, in order."""
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
    if not is_reward_dir(model_dir):
        raise UserError(f"'{model_dir}' is not a reward model dir (its metadata has no task: reward); --task pairwise "
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
                   dropped=data.stats["dropped"], identical=data.stats["identical"])
    predictions = [{"where": w, "chosen_score": float(c), "rejected_score": float(r)}
                   for w, c, r in zip(data.where, chosen, rejected)]
    return {"metrics": metrics, "predictions": predictions}


__all__ = ["bradley_terry", "collate_sides", "evaluate_pairwise", "pair_scores", "pairwise_metrics", "score_pairs"]
