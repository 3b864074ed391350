import pytest
import torch

from lmforge.config import ConfigError, apply_overrides, from_dict
from lmforge.models.config import ModelConfig
from lmforge.models.presets import PUBLISHED_PARAMS, describe, get_preset, preset_names
from lmforge.models.transformer import build_model, count_params


@pytest.mark.parametrize("name,count", sorted(PUBLISHED_PARAMS.items()))
def test_published_parameter_counts_hold_exactly(name, count):
    assert get_preset(name).num_params() == count


@pytest.mark.parametrize("name", preset_names())
def test_meta_build_matches_analytic_count(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        from lmforge.models.transformer import Transformer

        model = Transformer(cfg)
    assert count_params(model) == cfg.num_params()


def test_materialized_tiny_model_matches_count():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    assert count_params(model) == cfg.num_params()
    assert model.output.weight is model.tok_embeddings.weight  # tied survives to_empty


def test_flops_per_token_nanogpt_formula():
    cfg = get_preset("gpt2-124m")
    # 6N + 12·L·H·Q·T with N = matmul weights (incl. the tied head used as a matmul)
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    assert cfg.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize(
    "fields,needle",
    [
        (dict(dim=100, n_heads=8), "not divisible by model.n_heads"),
        (dict(n_heads=8, n_kv_heads=3), "not divisible by model.n_kv_heads"),
        (dict(dropout=1.5), "dropout"),
        (dict(activation="tanh"), "activation"),
        (dict(dimm=3), "did you mean 'dim'"),
    ],
)
def test_config_errors_name_the_key(fields, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(ModelConfig, fields, prefix="model")


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'llama2-7b'"):
        get_preset("llama2-7")


def test_overrides_parse_yaml_values():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "train.max_steps=10", "model.preset=tiny"])
    assert data == {"optim": {"lr": 3e-4}, "train": {"max_steps": 10}, "model": {"preset": "tiny"}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_swiglu_hidden_derivation_matches_llama():
    # Llama-7B: 4096 -> int(2*4*4096/3)=10922 -> rounded up to a multiple of 256 = 11008
    assert ModelConfig(dim=4096, n_heads=32, multiple_of=256).hidden_dim == 11008
    # Llama-3-8B: ffn_multiplier 1.3, multiple_of 1024 -> 14336
    assert ModelConfig(dim=4096, n_heads=32, ffn_multiplier=1.3, multiple_of=1024).hidden_dim == 14336


def test_describe_has_contract_keys():
    d = describe("llama2-7b")
    assert {"name", "params", "flops_per_token", "layers", "dim"} <= set(d)
