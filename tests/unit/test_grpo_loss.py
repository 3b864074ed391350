"""The GRPO loss pieces (`lmforge.train.losses`): group-relative advantages, the ratio and KL identities,
the three reductions. TRL parity of the whole loss is tests/parity/test_grpo_trl.py."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer
from lmforge.train.losses import (
    IGNORE,
    GRPOLoss,
    completion_logps,
    group_advantages,
    grpo_reduce,
    grpo_token_losses,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, max_seq_len=32))


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (4, 10), generator=g)
    targets = torch.full_like(tokens, IGNORE)
    for i, n in enumerate([5, 2, 4, 1]):
        targets[i, 3:3 + n] = tokens[i, 4:4 + n]
    return {"tokens": tokens, "targets": targets, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5])}


def test_group_advantages_mean_and_std_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(r, 4, scale_rewards=True)
    g0 = r[:4]
    assert torch.allclose(adv[:4], (g0 - g0.mean()) / (g0.std() + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # a group with one reward for all: no signal
    assert std[4:].eq(0).all() and std[0] == pytest.approx(0.5, abs=1e-7)
    adv_dr, _ = group_advantages(r, 4, scale_rewards=False)  # Dr. GRPO: no std division
    assert torch.allclose(adv_dr[:4], g0 - g0.mean())
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_one_iteration_ratio_is_exactly_one_and_kl_zero_for_the_reference():
    model = _model()
    b = _batch()
    logps = completion_logps(model(b["tokens"]), b["targets"])
    ref = logps.detach().clone()  # the policy is its own reference
    parts = grpo_token_losses(logps, b["advantages"], ref_logps=ref, beta=0.1)
    assert torch.equal(parts["ratio"], torch.ones_like(parts["ratio"]))
    assert torch.equal(parts["kl"], torch.zeros_like(parts["kl"]))
    assert not parts["clipped"].any()
    # on-policy with no KL the loss is -A per token; its gradient is the policy gradient -A ∇logp
    mask = b["targets"] != IGNORE
    s, n = grpo_reduce(parts["loss"], mask, "bnpo", 8)
    assert s.item() == pytest.approx(-(b["advantages"][:, None] * mask).sum().item(), abs=1e-6)
    assert n.item() == 12  # completion tokens


def test_clip_bounds_the_ratio_on_the_advantage_side():
    logps = torch.zeros(2, 1, requires_grad=True)
    old = torch.tensor([[-1.0], [1.0]])  # ratios e and 1/e
    parts = grpo_token_losses(logps, torch.tensor([1.0, -1.0]), old_logps=old, epsilon=0.2)
    assert torch.allclose(parts["loss"].detach(), torch.tensor([[-1.2], [0.8]]))
    assert parts["clipped"].all()
    parts["loss"].sum().backward()
    assert torch.equal(logps.grad, torch.zeros(2, 1))  # clipped tokens carry no gradient


def test_reductions():
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    s, n = grpo_reduce(loss, mask, "grpo", 5)
    assert (s / n).item() == pytest.approx((1.0 + 4.0) / 2)  # mean over rows of each row's token mean
    s, n = grpo_reduce(loss, mask, "bnpo", 5)
    assert (s / n).item() == pytest.approx(7.0 / 4)  # mean over tokens
    s, n = grpo_reduce(loss, mask, "dr_grpo", 5)
    assert (s / n).item() == pytest.approx(7.0 / 10)  # a constant divisor: rows × max_completion_length
    with pytest.raises(ValueError, match="loss_type"):
        grpo_reduce(loss, mask, "dapo", 5)


def test_loss_object_reports_kl_and_clip_ratio():
    model, ref = _model(0), _model(1)
    b = _batch()
    with torch.no_grad():
        b["ref_logps"] = completion_logps(ref(b["tokens"]), b["targets"])
    loss = GRPOLoss("grpo", beta=0.1)
    s, n = loss(model, b)
    s.backward()
    stats = loss.take_stats()
    assert stats["kl"] > 0 and stats["clip_ratio"] == 0.0
    assert loss.take_stats() == {"kl": 0.0, "clip_ratio": 0.0}  # reset after reading
    assert n.item() == 4
