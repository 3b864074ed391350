"""The model recipe options (README "Recipe"): `model.qk_norm`, `model.activation: relu2`, `model.logit_softcap`.

Each is off by default; on, it builds with the right shapes and parameter count, changes the model's output,
passes gradients to every parameter, survives a model-dir save/load, keeps cached decoding equal to a full
recompute, and is refused by the Hugging Face export (no exported family computes it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, UserError, from_dict
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model, count_params, softcap

BASE = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=32)
OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2", ffn_hidden=72),  # two matrices of 72 = the SwiGLU's three of 48
    "softcap": dict(logit_softcap=2.0),  # small, so that it bites at init scale too
}
ALL = {k: v for spec in OPTIONS.values() for k, v in spec.items()}


def _cfg(**over) -> ModelConfig:
    return from_dict(ModelConfig, {**BASE, **over}, prefix="model")


def _tokens(b=2, t=12, seed=0):
    return torch.randint(0, BASE["vocab_size"], (b, t), generator=torch.Generator().manual_seed(seed))


def test_defaults_are_off():
    cfg = ModelConfig()
    assert cfg.qk_norm is False and cfg.logit_softcap is None and cfg.activation == "swiglu"


@pytest.mark.parametrize("name", [*OPTIONS, "all"])
def test_shapes_and_parameter_count(name):
    spec = ALL if name == "all" else OPTIONS[name]
    cfg = _cfg(**spec)
    model = build_model(cfg, seed=0)
    assert model(_tokens()).shape == (2, 12, BASE["vocab_size"])
    assert count_params(model) == cfg.num_params()
    names = dict(model.named_parameters())
    if cfg.qk_norm:
        assert names["layers.0.attention.q_norm.weight"].shape == (cfg.head_dim,)
        assert names["layers.0.attention.k_norm.weight"].shape == (cfg.head_dim,)
    if cfg.activation == "relu2":
        assert "layers.0.feed_forward.w3.weight" not in names  # non-gated
        assert cfg.num_params() == _cfg().num_params() + (2 * cfg.head_dim * 2 if cfg.qk_norm else 0)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_changes_the_output(name):
    tokens = _tokens()
    base = build_model(_cfg(), seed=0).eval()
    model = build_model(_cfg(**OPTIONS[name]), seed=0).eval()
    shared = {k: v for k, v in base.state_dict().items() if k in model.state_dict()
              and model.state_dict()[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)  # same weights wherever the shapes agree
    with torch.no_grad():
        a, b = base(tokens), model(tokens)
    assert (a - b).abs().max() > 1e-3, f"{name} did not change the logits"
    if name == "softcap":  # exactly cap·tanh(logits/cap) of the uncapped model, bounded by the cap
        cap = OPTIONS[name]["logit_softcap"]
        torch.testing.assert_close(b, cap * torch.tanh(a / cap))
        assert b.abs().max() < cap


def test_relu2_is_squared_relu():
    cfg = _cfg(**OPTIONS["relu2"])
    ffn = build_model(cfg, seed=0).layers[0].feed_forward
    x = torch.randn(3, cfg.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ffn(x), ffn.w2(F.relu(ffn.w1(x)) ** 2))


def test_qk_norm_bounds_the_attention_logits():
    """With QK-norm, q and k of every head have RMS 1 (× the norm weight) whatever the projections' scale."""
    cfg = _cfg(qk_norm=True, pos_encoding="none")
    attn = build_model(cfg, seed=0).layers[0].attention
    with torch.no_grad():
        attn.wq.weight.mul_(100.0)
        attn.wk.weight.mul_(100.0)
    seen = {}
    attn.kernel = lambda q, k, v, *a: (seen.update(q=q, k=k), q)[1]  # record what attention receives
    attn(torch.randn(1, 5, cfg.dim, generator=torch.Generator().manual_seed(2)))
    for t in (seen["q"], seen["k"]):
        rms = t.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)


def test_softcap_function():
    x = torch.tensor([-1e4, -3.0, 0.0, 0.01, 3.0, 1e4])
    assert softcap(x, None) is x
    y = softcap(x, 30.0)
    assert y.abs().max() <= 30.0 and y[0] < 0 < y[-1]
    torch.testing.assert_close(y[3], torch.tensor(0.01), rtol=1e-4, atol=0)  # ≈ identity near zero


def test_gradients_reach_every_parameter():
    model = build_model(_cfg(**ALL), seed=0)
    tokens = _tokens(t=13)
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_model_dir_round_trip(tmp_path):
    from lmforge.artifacts.model_dir import load_model_dir, read_config, save_model_dir

    model = build_model(_cfg(**ALL), seed=3).eval()
    with torch.no_grad():  # non-trivial norm weights, so a dropped q_norm/k_norm would show
        for layer in model.layers:
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
            layer.attention.k_norm.weight.uniform_(0.5, 1.5)
    save_model_dir(model, tmp_path / "m")
    cfg = read_config(tmp_path / "m")
    assert (cfg.qk_norm, cfg.activation, cfg.logit_softcap) == (True, "relu2", 2.0)
    loaded = load_model_dir(tmp_path / "m").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_cached_decoding_matches_full_recompute():
    from lmforge.generate.kv_cache import KVCache

    cfg = _cfg(**ALL)
    model = build_model(cfg, seed=0).eval()
    tokens = _tokens(b=1, t=10)
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(cfg, 1, 16)
        steps = [model(tokens[:, :6], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("over,needle", [
    (dict(logit_softcap=0.0), "model.logit_softcap=0.0 must be positive"),
    (dict(logit_softcap=-5.0), "model.logit_softcap=-5.0 must be positive"),
    (dict(logit_softcap=30.0, lm_head=False), "model.logit_softcap caps the LM head"),
    (dict(activation="relu3"), "model.activation"),
])
def test_bad_values_name_the_key(over, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _cfg(**over)


@pytest.mark.parametrize("name", [n for n in OPTIONS if n not in ("relu2", "qk_norm")])  # exported as Arcee / Qwen3
def test_hf_export_refuses_options_hf_cannot_express(tmp_path, name, capsys):
    from lmforge.artifacts.hf.convert import export_hf
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.cli import main

    save_model_dir(build_model(_cfg(**OPTIONS[name]), seed=0), tmp_path / "m")
    key = {"qk_norm": "model.qk_norm=true", "softcap": "model.logit_softcap=2"}
    with pytest.raises(UserError, match=key[name].replace(".", r"\.")):
        export_hf(tmp_path / "m", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything was written
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key[name] in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "hf2").exists()


def test_training_loss_sees_the_soft_cap():
    """The chunked training loss (`lmforge.train.losses`) caps the logits exactly as the model's forward does."""
    from lmforge.train.losses import next_token_loss

    model = build_model(_cfg(**OPTIONS["softcap"]), seed=0).train()
    with torch.no_grad():
        model.output.weight.mul_(100.0)  # logits of a few units, where a cap of 2 bites
    tokens = _tokens(t=13)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    expected = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum")
    got = next_token_loss(model, inputs, targets, chunk=7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    uncapped = F.cross_entropy(model.output(model.hidden_states(inputs)).flatten(0, 1), targets.flatten(),
                               reduction="sum")
    assert abs(float(got - uncapped)) > 1e-2  # the cap bites here, so the comparison above means something
