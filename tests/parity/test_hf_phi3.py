"""Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``): split on import, concatenated back on export bit for bit; the
logit, padding and generation parity runs in test_hf_decoders.py (cases ``phi3-*`` of hf_tiny); the preset's
exact count against transformers; adapters on a Phi-3 base keep lmforge's layout (PEFT would need the fused
modules)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import make_hf_model
from safetensors.torch import load_file

from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.model_dir import load_weights
from lmforge.models.presets import PUBLISHED_PARAMS, get_preset

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["phi3-gqa-fused", "phi3-window-tied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_tensors_split_and_rejoin_bit_for_bit(name, dtype, hf_dir, tmp_path):
    hf = make_hf_model(name, seed=3, dtype=dtype)
    src = hf_dir(hf)
    s = import_hf(src, tmp_path / "lm")
    assert s["family"] == "phi3"
    sd = load_weights(tmp_path / "lm")
    cfg = hf.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    qkv = hf.state_dict()["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(sd["layers.1.attention.wq.weight"], qkv[:cfg.hidden_size])
    assert torch.equal(sd["layers.1.attention.wk.weight"], qkv[cfg.hidden_size:cfg.hidden_size + kv])
    assert torch.equal(sd["layers.1.attention.wv.weight"], qkv[cfg.hidden_size + kv:])
    gate_up = hf.state_dict()["model.layers.0.mlp.gate_up_proj.weight"]
    assert torch.equal(sd["layers.0.feed_forward.w1.weight"], gate_up[:cfg.intermediate_size])  # gate
    assert torch.equal(sd["layers.0.feed_forward.w3.weight"], gate_up[cfg.intermediate_size:])  # up
    export_hf(tmp_path / "lm", tmp_path / "out")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) and a[k].dtype == dtype for k in a)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["architectures"] == ["Phi3ForCausalLM"] and out_cfg["sliding_window"] == cfg.sliding_window


def test_phi3_mini_preset_counts_what_transformers_builds():
    with torch.device("meta"):
        hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, sliding_window=2047))
    assert sum(p.numel() for p in hf.parameters()) == get_preset("phi3-mini").num_params() \
        == PUBLISHED_PARAMS["phi3-mini"]


def test_adapters_on_a_phi3_base_keep_lmforge_layout(hf_dir, tmp_path):
    from lmforge.artifacts.adapter_dir import load_adapter, model_fingerprint, save_adapter_dir
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.config import UserError
    from lmforge.models.lora import LoraConfig, apply_lora, lora_state_dict

    import_hf(hf_dir(make_hf_model("phi3-gqa-fused")), tmp_path / "base")
    model = load_model_dir(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=["all-linear"]))
    args = (lora_state_dict(model), str(tmp_path / "base"), model_fingerprint(tmp_path / "base"), 2, 4.0,
            ["all-linear"])
    save_adapter_dir(tmp_path / "ad", *args)
    assert "peft_type" not in json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    load_adapter(tmp_path / "ad")
    with pytest.raises(UserError, match="cannot be a PEFT adapter"):
        save_adapter_dir(tmp_path / "ad2", *args, peft=True)
