"""Muon (lmforge.train.muon): the Newton–Schulz formula against an SVD, the update rule against a
hand-written reference, the AdamW half against torch.optim.AdamW, the RMS-matching scale, which
parameters get which rule, per-group learning rates through the schedule, and the config keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.config import ConfigError
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train.config import OptimConfig, load_config
from lmforge.train.muon import NS_COEFFICIENTS, MuonAdamW, lr_scale, newton_schulz
from lmforge.train.optim import build_optimizer, muon_matrices, muon_param_groups, set_lr

SHAPES = [(32, 64), (64, 32), (48, 48), (16, 128)]


def _model(**kw):
    return build_model(get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64, **kw), seed=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_orthogonalizes_along_the_svd(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = newton_schulz(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    # the quintic does not converge to 1 exactly: every singular value lands in about [0.68, 1.13]
    s = torch.linalg.svdvals(o)
    assert 0.6 < float(s.min()) and float(s.max()) < 1.25, s
    # ... but keeps G's singular vectors: Uᵀ·O·V is diagonal with positive entries (O = U·S'·Vᵀ)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    d = u.T @ o @ vh.T
    diag = torch.diagonal(d)
    assert float((d - torch.diag(diag)).abs().max()) < 1e-4
    assert float(diag.min()) > 0.6
    # so it points where the exact polar factor U·Vᵀ points
    polar = u @ vh
    assert float(torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0)) > 0.97


def test_newton_schulz_iteration_converges_to_the_polar_factor():
    """The same iteration with the classic cubic coefficients (1.5, -0.5, 0) and enough steps reaches U·Vᵀ
    exactly: the matrix form X ← aX + (b·XXᵀ + c·(XXᵀ)²)X is right, whatever the coefficients."""
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    o = newton_schulz(g.T, steps=60, coefficients=(1.5, -0.5, 0.0))  # the tall orientation too
    torch.testing.assert_close(o, (u @ vh).T, atol=1e-4, rtol=0)


def test_newton_schulz_rejects_non_matrices_and_bf16_path_is_close():
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz(torch.ones(3, 4, 5))
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    fp32, bf16 = newton_schulz(g), newton_schulz(g, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert float((fp32 - bf16).norm() / fp32.norm()) < 0.05


def test_lr_scale_formulas():
    assert lr_scale((64, 256), "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert lr_scale((256, 64), "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert lr_scale((256, 64), "original") == pytest.approx(2.0)
    assert lr_scale((64, 256), "original") == pytest.approx(1.0)
    assert lr_scale((64, 256), "none") == 1.0
    with pytest.raises(ValueError):
        lr_scale((2, 2), "bogus")


@pytest.mark.parametrize("shape", SHAPES)
def test_match_rms_adamw_gives_update_rms_of_0_2_lr(shape):
    """The point of the scale: every matrix, whatever its shape, moves by RMS ≈ 0.2·lr (AdamW's typical
    update RMS), so AdamW's learning rate transfers."""
    w = nn.Parameter(torch.zeros(*shape))
    opt = MuonAdamW([{"params": [w], "muon": True}], lr=1e-2, weight_decay=0.0)
    w.grad = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    opt.step()
    rms = float(w.detach().pow(2).mean().sqrt())
    assert 0.15 * 1e-2 < rms < 0.25 * 1e-2, rms


def test_muon_step_follows_the_formula():
    """Two steps against the rule written out: M ← μM + G; U ← G + μM; W ← W(1 − lr·wd) − lr·s·NS(U)."""
    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(16, 40, generator=gen)
    grads = [torch.randn(16, 40, generator=gen) for _ in range(2)]
    lr, wd, mu = 0.02, 0.1, 0.9
    w = nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [w], "muon": True}], lr=lr, weight_decay=wd, momentum=mu)
    ref, m = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        m = mu * m + g
        ref = ref * (1 - lr * wd) - lr * 0.2 * math.sqrt(40) * newton_schulz(g + mu * m)
    torch.testing.assert_close(w.detach(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], m)
    # without Nesterov the direction is the buffer itself
    v = nn.Parameter(w0.clone())
    opt = MuonAdamW([{"params": [v], "muon": True}], lr=lr, weight_decay=0.0, nesterov=False, lr_adjust="none")
    v.grad = grads[0].clone()
    opt.step()
    torch.testing.assert_close(v.detach(), w0 - lr * newton_schulz(grads[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_groups_match_torch_adamw(fused):
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(8, 4, generator=gen), torch.randn(4, generator=gen)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]
    kw = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    a = MuonAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:], "weight_decay": 0.0}],
                  fused=fused, **kw)
    b = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}],
                          fused=fused, **kw)
    for _ in range(3):
        gs = [torch.randn(t.shape, generator=gen) for t in init]
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
        assert set(a.state[p]) == set(b.state[q]) == {"step", "exp_avg", "exp_avg_sq"}


def test_muon_rejects_non_matrix_params():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [nn.Parameter(torch.ones(4))], "muon": True}], lr=1e-3)


def test_which_parameters_get_muon():
    model = _model(bias=True, tie_embeddings=False)
    groups = muon_param_groups(model, OptimConfig(name="muon", weight_decay=0.1))
    muon = [g for g in groups if g.get("muon")]
    assert len(muon) == 1
    names = set(muon[0]["names"])
    blocks = {f"layers.{i}.{m}.weight" for i in range(2)
              for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert names == blocks
    adamw = {n for g in groups if not g.get("muon") for n in g["names"]}
    assert {"tok_embeddings.weight", "output.weight", "norm.weight", "layers.0.attention_norm.weight",
            "layers.0.attention.wq.bias"} <= adamw
    assert not names & adamw
    # every trainable parameter exactly once
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    # the decoupled weight decay: Muon's own, AdamW's decay group keeps optim.weight_decay (untied head)
    groups = muon_param_groups(model, OptimConfig(name="muon", weight_decay=0.1, muon_weight_decay=0.02))
    assert [g["weight_decay"] for g in groups if g.get("muon")] == [0.02]
    assert any("output.weight" in g["names"] and g["weight_decay"] == 0.1 for g in groups)


def test_lora_adapters_and_frozen_bases_stay_off_muon(capsys):
    from lmforge.models.lora import LoraConfig, apply_lora

    model = _model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["wq", "wv"]))
    assert muon_matrices(model) == set()  # frozen base weights; adapters are not nn.Linear weights
    opt = build_optimizer(model, OptimConfig(name="muon"))  # all AdamW, and a note says so
    assert not any(g["muon"] for g in opt.param_groups)
    assert "found no trainable matrix" in capsys.readouterr().err
    model = _model()
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["wq"]), trainable=("layers.1.",))
    names = {n for g in muon_param_groups(model, OptimConfig(name="muon")) if g.get("muon") for n in g["names"]}
    # a block unfrozen by name trains its full matrices (the adapted wq's base included) with Muon
    assert names == {f"layers.1.{m}.weight" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                                      "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert not any("lora" in n for n in names)


def test_schedule_drives_each_group_at_its_own_lr():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=2e-2))
    assert isinstance(opt, MuonAdamW)
    set_lr(opt, 5e-4)  # the schedule at half of optim.lr
    lrs = {bool(g["muon"]): g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(1e-2) and lrs[False] == pytest.approx(5e-4)
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3))  # muon_lr unset: optim.lr
    set_lr(opt, 5e-4)
    assert all(g["lr"] == pytest.approx(5e-4) for g in opt.param_groups)
    assert isinstance(build_optimizer(model, OptimConfig()), torch.optim.AdamW)


def test_muon_trains_a_tiny_model_and_state_dict_round_trips():
    torch.manual_seed(0)
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-2))
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    wq = model.layers[0].attention.wq.weight
    assert "momentum_buffer" in opt.state[wq]
    # a plain torch state dict round-trips into a fresh optimizer (the checkpoint path goes through DCP)
    fresh = build_optimizer(model, OptimConfig(name="muon", lr=1e-2))
    fresh.load_state_dict(opt.state_dict())
    torch.testing.assert_close(fresh.state[wq]["momentum_buffer"], opt.state[wq]["momentum_buffer"])


def test_ns_dtype_auto_is_fp32_on_cpu():
    opt = build_optimizer(_model(), OptimConfig(name="muon"))
    assert {g["ns_dtype"] for g in opt.param_groups if g["muon"]} == {"float32"}
    opt = build_optimizer(_model(), OptimConfig(name="muon", muon_ns_dtype="bf16"))
    assert {g["ns_dtype"] for g in opt.param_groups if g["muon"]} == {"bfloat16"}
    assert NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315)


BASE = {"model": {"preset": "tiny"}, "data": {"dir": "d"}, "train": {"global_batch": 8, "max_steps": 10}}


def test_config_keys_load_and_validate():
    cfg = load_config(None, ["optim.name=muon", "optim.muon_lr=0.02", "optim.muon_lr_adjust=original"], base=BASE)
    assert (cfg.optim.name, cfg.optim.muon_lr, cfg.optim.muon_lr_adjust) == ("muon", 0.02, "original")
    for override, key in (("optim.name=sgd", "optim.name"), ("optim.muon_lr=0", "optim.muon_lr"),
                          ("optim.muon_momentum=1.0", "optim.muon_momentum"),
                          ("optim.muon_ns_steps=0", "optim.muon_ns_steps"),
                          ("optim.muon_weight_decay=-1", "optim.muon_weight_decay"),
                          ("optim.muon_lr=.nan", "optim.muon_lr"),
                          ("optim.muon_ns_dtype=fp16", "optim.muon_ns_dtype")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override], base=BASE)


def test_block_matrices_are_found_through_activation_checkpoint_wrappers():
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig

    model = _model()
    before = {n for g in muon_param_groups(model, OptimConfig(name="muon")) if g.get("muon") for n in g["names"]}
    parallelize(model, ParallelConfig(activation_checkpoint="full"))
    after = [n for g in muon_param_groups(model, OptimConfig(name="muon")) if g.get("muon") for n in g["names"]]
    assert len(before) == 14 and len(after) == 14
