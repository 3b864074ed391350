"""`lmforge export --format gguf --model RUN/adapter`: a GGUF LoRA file laid out as llama.cpp's
convert_lora_to_gguf.py writes one, read back with the `gguf` package (no llama.cpp here): names, shapes,
metadata, and W + (alpha/r)·B·A equal to the merged model's weight in the GGUF layout (the q/k row order)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.artifacts.adapter_dir import model_fingerprint, save_adapter_dir
from lmforge.artifacts.gguf.lora import export_gguf_lora
from lmforge.artifacts.gguf.tensors import gguf_name, to_gguf_layout
from lmforge.artifacts.model_dir import save_model_dir
from lmforge.cli import main
from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.lora import LoraConfig, apply_lora, lora_state_dict, merge_lora
from lmforge.models.transformer import build_model

SHAPES = {"llama": {"n_kv_heads": 2}, "qwen2": {"n_kv_heads": 1, "qkv_bias": True},
          "qwen3": {"n_kv_heads": 2, "qk_norm": True}}


def _adapter(tmp_path, shape_kw, peft_layout, targets=("all-linear",), rank=4, alpha=8.0):
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=64, **shape_kw)
    save_model_dir(build_model(cfg, seed=0), tmp_path / "base")
    from lmforge.artifacts.model_dir import load_model_dir

    model = load_model_dir(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=rank, alpha=alpha, targets=list(targets)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter_dir(tmp_path / "adapter", lora_state_dict(model), str(tmp_path / "base"),
                     model_fingerprint(tmp_path / "base"), rank, alpha, list(targets), peft=peft_layout)
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    merged = copy.deepcopy(model)
    merge_lora(merged)
    return cfg, base_sd, merged.state_dict()


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("peft_layout", [None, False])  # RUN/adapter as written now (PEFT) and the older layout
def test_gguf_lora_reads_back_and_merges_to_the_merged_model(tmp_path, arch, peft_layout, capsys):
    cfg, base_sd, merged_sd = _adapter(tmp_path, SHAPES[arch], peft_layout)
    assert main(["export", "--model", str(tmp_path / "adapter"), "--format", "gguf", "--dtype", "f32",
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["architecture"] == arch and summary["tensors"] == 2 * 7 * 2
    r = gguf.GGUFReader(str(tmp_path / "out" / "adapter-f32.gguf"))
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["adapter.lora.alpha"].contents() == 8.0
    stored = {t.name: np.array(t.data) for t in r.tensors}
    modules = [k.removesuffix(".weight") for k in base_sd
               if k.endswith(".weight") and (".attention.w" in k or ".feed_forward.w" in k)]
    assert len(modules) == 14
    want_names = {f"{gguf_name(m + '.weight')}.lora_{x}" for m in modules for x in "ab"}
    assert set(stored) == want_names
    assert "blk.1.attn_q.weight.lora_a" in stored and "blk.0.ffn_down.weight.lora_b" in stored
    for m in modules:
        key = m + ".weight"
        a, b = stored[f"{gguf_name(key)}.lora_a"], stored[f"{gguf_name(key)}.lora_b"]
        assert a.shape == (4, base_sd[key].shape[1]) and b.shape == (base_sd[key].shape[0], 4)
        w = to_gguf_layout(key, base_sd[key], cfg, permute_qk=arch == "llama").numpy()
        want = to_gguf_layout(key, merged_sd[key], cfg, permute_qk=arch == "llama").numpy()
        np.testing.assert_allclose(w + 2.0 * (b @ a), want, atol=1e-5, rtol=0)
        assert np.abs(want - w).max() > 1e-2  # the adapter changes the weight: the check above means something


def test_f16_lora_file_and_refusals(tmp_path):
    _adapter(tmp_path, SHAPES["llama"], None, targets=("wq", "wv"))
    s = export_gguf_lora(tmp_path / "adapter", tmp_path / "out", "f16")
    assert s["tensor_types"] == {"f16": 8} and s["file"].endswith("adapter-f16.gguf")
    with pytest.raises(UserError, match="not a GGUF type"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "out2", "q4")
    # a base no llama.cpp graph computes is refused as exporting the base would be
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=1, n_heads=4, ffn_hidden=96, max_seq_len=64,
                      activation="gelu", norm="layernorm", pos_encoding="learned", bias=True)
    save_model_dir(build_model(cfg, seed=0), tmp_path / "gbase")
    from lmforge.artifacts.model_dir import load_model_dir

    model = load_model_dir(tmp_path / "gbase")
    apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets=["wq"]))
    save_adapter_dir(tmp_path / "gad", lora_state_dict(model), str(tmp_path / "gbase"), "x", 2, 2.0, ["wq"])
    with pytest.raises(UserError, match="GGUF export needs a Llama-family decoder"):
        export_gguf_lora(tmp_path / "gad", tmp_path / "out3", "f32")
    assert not (tmp_path / "out3").exists()
