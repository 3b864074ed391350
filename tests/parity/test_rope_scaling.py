"""YaRN (``rope_type: yarn``, as Qwen2.5 / Qwen3 ship it for long contexts) and dynamic NTK (``rope_type:
dynamic``) RoPE scaling equal to `transformers`: the frequencies (and YaRN's attention factor), and the logits
of imported tiny models on positions far beyond the original context; export writes them back; GGUF refuses
them."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import V, _perturb_norms

from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import UserError
from lmforge.models.config import ModelConfig, RopeScaling
from lmforge.models.positional import rope_attention_scale, rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

ATOL = 1e-5
_SMALL = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
          "eos_token_id": 2}
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("spec", [
    {"factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen2.5 / Qwen3's published setting
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3},
    {"factor": 2.0, "original_max_position_embeddings": 2048, "truncate": False}])
@pytest.mark.parametrize("theta,head_dim", [(1000000.0, 128), (10000.0, 64)])
def test_frequencies_and_attention_factor_equal_transformers(spec, theta, head_dim):
    hf_cfg = transformers.Qwen3Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=head_dim, num_hidden_layers=1, vocab_size=V,
                                      max_position_embeddings=int(spec["factor"] * spec["original_max_position_embeddings"]),
                                      rope_parameters={"rope_type": "yarn", "rope_theta": theta, **spec})
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    from lmforge.artifacts.hf.families import hf_to_model_config

    cfg = hf_to_model_config(hf_cfg.to_dict())
    assert cfg.rope_scaling.type == "yarn"
    assert torch.equal(rope_inv_freq(cfg), want_inv)
    assert rope_attention_scale(cfg) == pytest.approx(want_scale, abs=1e-12)


def _model(cls_name, cfg_name, seed=0, **kw):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**{**_SMALL, **kw})).eval()
    _perturb_norms(model, seed)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_long_positions_equal_transformers_and_export_round_trips(family, hf_dir, tmp_path):
    cls, cfgc = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                 "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}[family]
    extra = {"head_dim": 32} if family == "qwen3" else {}
    hf = _model(cls, cfgc, rope_scaling=dict(YARN), rope_theta=10000.0, **extra)
    import_hf(hf_dir(hf), tmp_path / "lm")
    lm = load_model_dir(tmp_path / "lm").eval()
    assert lm.cfg.rope_scaling == RopeScaling(type="yarn", factor=8.0, original_max_seq_len=16)
    x = torch.randint(3, V, (1, 200), generator=torch.Generator().manual_seed(0))  # 12x the original context
    with torch.no_grad():
        want = hf(x).logits
        got = lm(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the scaling matters on these positions: without it lmforge computes something else
    import dataclasses

    unscaled = dataclasses.replace(lm.cfg, rope_scaling=None)
    from lmforge.models.transformer import Transformer

    other = Transformer(unscaled).eval()
    other.load_state_dict(lm.state_dict())
    with torch.no_grad():
        assert (other(x) - want).abs().max() > 1e-3
    export_hf(tmp_path / "lm", tmp_path / "out")
    rs = json.loads((tmp_path / "out" / "config.json").read_text())
    spec = rs.get("rope_scaling") or rs.get("rope_parameters")
    assert spec["rope_type"] == "yarn" and spec["factor"] == 8.0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)


def test_v4_type_key_and_refusals():
    from lmforge.artifacts.hf.families import hf_to_model_config

    base = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96,
            "num_hidden_layers": 1, "vocab_size": V, "rope_theta": 1000000.0}
    cfg = hf_to_model_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 32768}})
    assert (cfg.rope_scaling.type, cfg.rope_scaling.factor, cfg.rope_scaling.original_max_seq_len) == ("yarn", 4.0,
                                                                                                        32768)
    with pytest.raises(UserError, match="mscale"):
        hf_to_model_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 1.0,
                                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 64}})
    with pytest.raises(UserError, match="'linear' is not supported"):
        hf_to_model_config({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_gguf_refuses_yarn_and_dynamic(kind):
    from lmforge.artifacts.gguf.export import gguf_architecture

    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=1, n_heads=4, ffn_hidden=96,
                      rope_scaling=RopeScaling(type=kind, factor=4.0, original_max_seq_len=64))
    with pytest.raises(UserError, match=f"rope_scaling type '{kind}' is not written to GGUF"):
        gguf_architecture(cfg)


# ---- dynamic NTK ---------------------------------------------------------------------------------------
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0}


@pytest.mark.parametrize("seq_len", [10, 32, 33, 100, 1000])
@pytest.mark.parametrize("theta,head_dim", [(1000000.0, 128), (10000.0, 16)])
def test_dynamic_frequencies_equal_transformers(seq_len, theta, head_dim):
    hf_cfg = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=head_dim, num_hidden_layers=1, vocab_size=V, max_position_embeddings=32,
                                      rope_parameters={"rope_theta": theta, **DYNAMIC})
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=torch.tensor(seq_len))  # as its forward calls it
    from lmforge.artifacts.hf.families import hf_to_model_config
    from lmforge.models.positional import rope_dynamic_inv_freq

    cfg = hf_to_model_config(hf_cfg.to_dict())
    assert cfg.rope_scaling == RopeScaling(type="dynamic", factor=4.0, original_max_seq_len=32)
    positions = torch.arange(seq_len)[None]
    got = rope_dynamic_inv_freq(cfg, rope_inv_freq(cfg), positions)
    assert torch.equal(got, want)
    assert rope_attention_scale(cfg) == 1.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_dynamic_long_positions_generation_and_export_equal_transformers(family, hf_dir, tmp_path):
    cls, cfgc = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config")}[family]

    def fresh():  # transformers keeps the longest length seen: each comparison starts from a fresh model
        return _model(cls, cfgc, max_position_embeddings=32, rope_scaling=dict(DYNAMIC), rope_theta=10000.0)

    import_hf(hf_dir(fresh()), tmp_path / "lm")
    lm = load_model_dir(tmp_path / "lm").eval()
    x = torch.randint(3, V, (1, 100), generator=torch.Generator().manual_seed(0))  # 3x the original context
    with torch.no_grad():
        want = fresh()(x).logits
        torch.testing.assert_close(lm(x), want, atol=ATOL, rtol=0)
        short = fresh()(x[:, :20]).logits  # within the original context: plain RoPE
        torch.testing.assert_close(lm(x[:, :20]), short, atol=ATOL, rtol=0)
        plain = _model(cls, cfgc, max_position_embeddings=32, rope_theta=10000.0)(x).logits
    assert (plain - want).abs().max() > 1e-3  # the same weights without the scaling: far off
    # greedy decoding with the KV cache across the original context (positions 20 -> 60)
    from lmforge.generate.engine import generate

    hf = fresh()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    prompt = x[0, :20].tolist()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[:, 20:].tolist()
    assert generate(lm, [prompt], max_new_tokens=40) == theirs
    export_hf(tmp_path / "lm", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, want, atol=ATOL, rtol=0)
