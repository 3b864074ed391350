"""LoRA adapters in PEFT's format, against the real `peft` package on tiny random `transformers` models:
RUN/adapter (and `export --format peft`) loads with `peft.PeftModel.from_pretrained(hf_base, dir)` with the
logits of lmforge's merged model, and lmforge loads a PEFT adapter trained elsewhere on an imported base."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hf_tiny import V, make_hf_model

from lmforge.artifacts.adapter_dir import load_adapter, model_fingerprint, save_adapter_dir
from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.cli import main
from lmforge.config import UserError
from lmforge.models.lora import LoraConfig, apply_lora, lora_state_dict, merge_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ATOL = 1e-5
# family case (hf_tiny) x LoRA targets: attention only, MLP only, every projection; bases with and without
# biases (llama-bias-headdim: every linear; qwen2: q/k/v), GQA, tied and untied heads, a sliding window.
PEFT_CASES = [("llama-mha-untied", ["all-linear"]), ("llama-bias-headdim", ["attention"]),
              ("llama3-gqa-tied-ropescaling", ["mlp"]), ("mistral-gqa-window", ["wq", "wv", "w2"]),
              ("qwen2-gqa-qkvbias", ["all-linear"]), ("qwen2-tied", ["wk", "wo", "w1", "w3"]),
              ("qwen3-gqa-qknorm", ["all-linear"])]


def _tokens(seed=0, b=2, t=16):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _trained_adapter(name, targets, hf_dir, tmp_path, rank=4, alpha=8.0, peft_layout=None):
    """Import a tiny HF model, put LoRA with random weights on it, write RUN/adapter as finetune does.
    Returns (adapter dir, lmforge merged model, exported HF base dir)."""
    import_hf(hf_dir(make_hf_model(name)), tmp_path / "base")
    model = load_model_dir(tmp_path / "base")
    apply_lora(model, LoraConfig(rank=rank, alpha=alpha, targets=targets))
    _randomize_lora(model)
    save_adapter_dir(tmp_path / "adapter", lora_state_dict(model), str(tmp_path / "base"),
                     model_fingerprint(tmp_path / "base"), rank, alpha, targets, peft=peft_layout)
    merged = copy.deepcopy(model)
    assert merge_lora(merged) > 0
    export_hf(tmp_path / "base", tmp_path / "hf_base")
    return tmp_path / "adapter", merged.eval(), tmp_path / "hf_base"


def _peft_logits(hf_base_dir, adapter_dir, x):
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize(("name", "targets"), PEFT_CASES)
def test_run_adapter_loads_in_peft_with_merged_logits(name, targets, hf_dir, tmp_path):
    adapter, merged, hf_base = _trained_adapter(name, targets, hf_dir, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["bias"] == "none"
    assert all(m.endswith("_proj") for m in cfg["target_modules"])
    x = _tokens()
    with torch.no_grad():
        want = merged(x)
    got = _peft_logits(hf_base, adapter, x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # the adapters change the model: a base without them is far off
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(hf_base).eval()(x).logits
    assert (plain - want).abs().max() > 1e-2
    # lmforge reads its PEFT-format dir back: same logits, same metadata
    unmerged, meta = load_adapter(adapter)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(x), want, atol=ATOL, rtol=0)
    info = read_metadata(adapter)
    assert info.kind == "adapter" and meta["rank"] == 4 and meta["targets"] == targets


def test_peft_adapter_trained_elsewhere_loads_on_imported_base(hf_dir, tmp_path):
    hf = make_hf_model("qwen2-gqa-qkvbias", seed=3)
    src = hf_dir(hf)
    lora = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(src).eval(), lora)
    _randomize_lora(pm, seed=5)
    pm.save_pretrained(tmp_path / "peft_ad")
    x = _tokens(2)
    with torch.no_grad():
        want = pm.eval()(x).logits
    import_hf(src, tmp_path / "base")
    model, meta = load_adapter(tmp_path / "peft_ad", base=tmp_path / "base")
    assert meta["rank"] == 4 and meta["alpha"] == 6.0 and meta["hf_family"] == "qwen2"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)
    # merged into the base, it is still the same model
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=ATOL, rtol=0)
    # without a base: a one-line error naming the fix
    with pytest.raises(UserError, match="lmforge import"):
        load_adapter(tmp_path / "peft_ad")


def test_peft_options_lmforge_does_not_compute_are_refused(hf_dir, tmp_path):
    src = hf_dir(make_hf_model("llama-mha-untied"))
    import_hf(src, tmp_path / "base")
    for extra, match in (({"use_dora": True}, "DoRA"), ({"bias": "lora_only"}, "bias"),
                         ({"target_modules": ["q_proj", "lm_head"]}, "lm_head")):
        kw = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **extra}
        pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(src), peft.LoraConfig(**kw))
        out = tmp_path / f"ad_{next(iter(extra))}"
        pm.save_pretrained(out)
        with pytest.raises(UserError, match=match):
            load_adapter(out, base=tmp_path / "base")


def test_export_format_peft_converts_an_old_layout_adapter(hf_dir, tmp_path, capsys):
    adapter, merged, hf_base = _trained_adapter("llama-mha-untied", ["wq", "wv"], hf_dir, tmp_path,
                                                peft_layout=False)
    old = json.loads((adapter / "adapter_config.json").read_text())
    assert "peft_type" not in old and old["lmforge"]["kind"] == "adapter"  # lmforge's own layout
    assert main(["export", "--model", str(adapter), "--format", "peft", "--out", str(tmp_path / "p"),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["family"] == "llama" and summary["tensors"] == 8
    x = _tokens(3)
    with torch.no_grad():
        want = merged(x)
    torch.testing.assert_close(_peft_logits(hf_base, tmp_path / "p", x), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(load_adapter(tmp_path / "p")[0](x), want, atol=ATOL, rtol=0)
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "base"), "--format", "peft", "--out", str(tmp_path / "q")]) == 2
    assert "is a model dir; --format peft exports an adapter dir" in capsys.readouterr().err


def test_gpt2_adapters_keep_lmforge_layout(hf_dir, tmp_path):
    adapter, merged, _ = _trained_adapter("gpt2-tied", ["wq", "wv"], hf_dir, tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert "peft_type" not in cfg and cfg["rank"] == 4
    x = _tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(adapter)[0](x), merged(x), atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="PEFT adapter"):
        save_adapter_dir(tmp_path / "x", lora_state_dict(load_adapter(adapter)[0]), str(tmp_path / "base"),
                         "f", 4, 8.0, ["wq", "wv"], peft=True)


def test_finetune_run_adapter_loads_in_peft_with_run_model_logits(tmp_path, make_tokenizer):
    """The whole path: `lmforge finetune` (LoRA on every projection) → RUN/adapter → peft on the HF export of
    the base gives RUN/model's logits."""
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tasks.config import config_from_dict
    from lmforge.tasks.run import run as finetune

    rows = [{"instruction": "Say hello.", "input": "", "output": "Hello there."},
            {"instruction": "What is two plus two?", "input": "", "output": "Four."}] * 8
    make_tokenizer(tmp_path, [r["instruction"] + " " + r["output"] for r in rows] * 5, vocab_size=300, name="tok")
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      tie_embeddings=True)
    base = save_model_dir(build_model(cfg, seed=0), tmp_path / "base", tokenizer_dir=str(tmp_path / "tok"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = finetune(config_from_dict({
        "run": {"dir": str(tmp_path / "run")}, "model": {"from": str(base)},
        "data": {"train": [str(tmp_path / "train.jsonl")], "seq_len": 32, "batching": "pack"},
        "train": {"global_batch": 4, "micro_batch": 4, "max_steps": 4, "device": "cpu", "threads": 1},
        "optim": {"lr": 5e-2}, "schedule": {"name": "constant"}, "finetune": {"mode": "lora"},
        "lora": {"rank": 4, "alpha": 8, "targets": ["all-linear"], "dropout": 0.0},
        "log": {"interval": 1, "progress": False, "peak_tflops": 1.0}}))
    cfg_json = json.loads((Path(res.adapter_dir) / "adapter_config.json").read_text())
    assert cfg_json["peft_type"] == "LORA" and len(cfg_json["target_modules"]) == 7
    export_hf(base, tmp_path / "hf_base")
    x = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_model_dir(res.model_dir).eval()(x)
        plain = load_model_dir(base).eval()(x)
    assert (want - plain).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(_peft_logits(tmp_path / "hf_base", res.adapter_dir, x), want, atol=ATOL, rtol=0)
