"""Llama / Mistral / Qwen2 / GPT-2: import and export against `transformers` on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import CASES, DECODER_CASES, V, make_hf_model
from safetensors.torch import load_file

from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import UserError
from lmforge.generate.engine import generate

transformers = pytest.importorskip("transformers")
ATOL = 1e-5


def _tokens(seed=0, b=2, t=20):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _import(model, hf_dir, tmp_path, **save_kw):
    src = hf_dir(model, **save_kw)
    import_hf(src, tmp_path / "lm")
    return src, load_model_dir(tmp_path / "lm").eval()


@pytest.mark.parametrize("name", DECODER_CASES)
def test_imported_logits_equal_transformers(name, hf_dir, tmp_path):
    hf = make_hf_model(name)
    _, lm = _import(hf, hf_dir, tmp_path)
    x = _tokens()
    with torch.no_grad():
        want = hf(x).logits
        got = lm(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # Padding: left-padded rows with HF's attention mask vs lmforge's key mask and positions.
    attn = torch.ones_like(x)
    attn[0, :5] = 0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = attn.bool()[:, None, None, :] | torch.eye(x.size(1), dtype=torch.bool)[None, None]
    with torch.no_grad():
        want = hf(x, attention_mask=attn, position_ids=positions).logits
        got = lm(x, positions=positions, mask=mask)
    torch.testing.assert_close(got[0, 5:], want[0, 5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", DECODER_CASES)
def test_export_loads_in_transformers_with_equal_logits(name, hf_dir, tmp_path):
    hf = make_hf_model(name, seed=1)
    _import(hf, hf_dir, tmp_path)
    export_hf(tmp_path / "lm", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == CASES[name][1]
    x = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", DECODER_CASES)
def test_greedy_generation_identical(name, hf_dir, tmp_path):
    hf = make_hf_model(name, seed=2)
    _, lm = _import(hf, hf_dir, tmp_path)
    prompts = [[5, 9, 17, 33, 4, 8, 60, 11], [7, 3, 99]]  # different lengths: left padding on both sides
    n = 16
    ours = generate(lm, prompts, max_new_tokens=n)
    L = max(map(len, prompts))
    ids = torch.zeros(2, L, dtype=torch.long)
    attn = torch.zeros(2, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    hf.generation_config.eos_token_id = None  # run the full length, like lmforge without an EOS id
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=attn, max_new_tokens=n, do_sample=False)[:, L:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("name", ["llama3-gqa-tied-ropescaling", "gpt2-tied", "qwen2-gqa-qkvbias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_import_export_reproduces_every_tensor_bit_for_bit(name, dtype, hf_dir, tmp_path):
    hf = make_hf_model(name, seed=3, dtype=dtype)
    src = hf_dir(hf)
    summary = import_hf(src, tmp_path / "lm")
    export_hf(tmp_path / "lm", tmp_path / "out")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert a[k].shape == b[k].shape and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "architectures"):
        assert cfg_out.get(key) == cfg_in.get(key), key
    assert summary["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]


def test_sharded_checkpoints_both_ways(hf_dir, tmp_path):
    hf = make_hf_model("llama-mha-untied", seed=4)
    src = hf_dir(hf, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").is_file()
    import_hf(src, tmp_path / "lm")
    out = export_hf(tmp_path / "lm", tmp_path / "out", max_shard_bytes=40_000)
    shards = [f for f in out["files"] if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in out["files"]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def test_pytorch_model_bin_is_read_with_weights_only(hf_dir, tmp_path):
    hf = make_hf_model("gpt2-tied", seed=5)
    src = tmp_path / "bin"
    src.mkdir()
    hf.config.save_pretrained(src)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # the original `gpt2` layout: no prefix
    torch.save(sd, src / "pytorch_model.bin")
    import_hf(src, tmp_path / "lm")
    lm = load_model_dir(tmp_path / "lm").eval()
    x = _tokens(5)
    with torch.no_grad():
        torch.testing.assert_close(lm(x), hf(x).logits, atol=ATOL, rtol=0)


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_code_in_pytorch_model_bin_is_refused(tmp_path, capsys):
    src = tmp_path / "evil"
    src.mkdir()
    make_hf_model("gpt2-tied").config.save_pretrained(src)
    torch.save({"wte.weight": _Evil()}, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="cannot be read safely"):
        import_hf(src, tmp_path / "lm")
    assert "pickle code ran" not in capsys.readouterr().out


def test_sliding_window_is_what_makes_mistral_match(hf_dir, tmp_path):
    """The window matters for these inputs: without it lmforge's logits differ from Mistral's."""
    hf = make_hf_model("mistral-gqa-window", seed=6)
    _, lm = _import(hf, hf_dir, tmp_path)
    x = _tokens(6)
    lm.cfg.sliding_window = None
    for layer in lm.layers:
        layer.attention.cfg.sliding_window = None
    with torch.no_grad():
        assert (lm(x) - hf(x).logits).abs().max() > 1e-3


def test_unknown_tensor_and_missing_tensor_are_named(hf_dir, tmp_path):
    from safetensors.torch import save_file

    hf = make_hf_model("llama-mha-untied")
    src = hf_dir(hf)
    sd = load_file(str(src / "model.safetensors"))
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="does not know.*extra"):
        import_hf(src, tmp_path / "lm")
    del sd["model.layers.0.self_attn.extra.weight"], sd["model.norm.weight"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(UserError, match="missing 'model.norm.weight'"):
        import_hf(src, tmp_path / "lm")
    assert not (tmp_path / "lm").exists()  # nothing half-written


def test_unsupported_configs_are_clear_errors(tmp_path):
    from lmforge.artifacts.hf.families import hf_to_model_config

    base = CASES["llama-mha-untied"][2]
    with pytest.raises(UserError, match="rope scaling type 'linear'"):  # yarn, dynamic: test_rope_scaling.py
        hf_to_model_config({**base, "model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    with pytest.raises(UserError, match="hidden_act='gelu'"):
        hf_to_model_config({**base, "model_type": "llama", "hidden_act": "gelu"})
    with pytest.raises(UserError, match="model_type 't5'"):
        hf_to_model_config({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    # v5's rope_parameters layout reads the same as v4's rope_theta + rope_scaling
    v5 = hf_to_model_config({**base, "model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    v4 = hf_to_model_config({**base, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}})
    assert v5 == v4 and v5.rope_scaling.original_max_seq_len == 16 and v5.rope_theta == 5e5
