"""Qwen3 (QK-norm): import and export against `transformers`' Qwen3ForCausalLM on tiny random models, its chat
template carried over, and the published presets' exact parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import V, _perturb_norms
from safetensors.torch import load_file

from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import load_model_dir, load_weights, save_model_dir
from lmforge.config import UserError
from lmforge.generate.engine import generate
from lmforge.models.config import ModelConfig
from lmforge.models.presets import PUBLISHED_PARAMS, get_preset
from lmforge.models.transformer import build_model

transformers = pytest.importorskip("transformers")
ATOL = 1e-5
_SMALL = {"vocab_size": V, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 1000000.0}
CASES = {"qwen3-gqa-untied": dict(_SMALL, num_key_value_heads=2, head_dim=32),  # head_dim != hidden / heads
         "qwen3-mha-tied": dict(_SMALL, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True)}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_qwen3(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**CASES[name], **kw})).eval()
    _perturb_norms(model, seed)  # q_norm / k_norm weights away from 1: a dropped or swapped norm shows
    return model


def _tokens(seed=0, b=2, t=20):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_import_and_export_logits_equal_transformers(name, hf_dir, tmp_path):
    hf = make_qwen3(name)
    src = hf_dir(hf)
    s = import_hf(src, tmp_path / "lm")
    assert s["family"] == "qwen3"
    lm = load_model_dir(tmp_path / "lm").eval()
    assert lm.cfg.qk_norm and lm.cfg.head_dim == CASES[name]["head_dim"]
    x = _tokens()
    attn = torch.ones_like(x)
    attn[0, :5] = 0
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    mask = attn.bool()[:, None, None, :] | torch.eye(x.size(1), dtype=torch.bool)[None, None]
    with torch.no_grad():
        torch.testing.assert_close(lm(x), hf(x).logits, atol=ATOL, rtol=0)
        want = hf(x, attention_mask=attn, position_ids=positions).logits
        got = lm(x, positions=positions, mask=mask)
    torch.testing.assert_close(got[0, 5:], want[0, 5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=ATOL, rtol=0)
    # greedy generation with lmforge's KV cache = transformers' generate
    prompt = [5, 9, 17, 33, 4, 8]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[:, 6:].tolist()
    assert generate(lm, [prompt], max_new_tokens=8) == theirs
    # export: transformers loads Qwen3ForCausalLM with the same logits and every tensor bit for bit
    export_hf(tmp_path / "lm", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=0, rtol=0)
    want_sd = {k: v for k, v in hf.state_dict().items() if not (CASES[name].get("tie_word_embeddings")
                                                                and k == "lm_head.weight")}
    got_sd = load_file(tmp_path / "out" / "model.safetensors")
    assert set(got_sd) == set(want_sd)
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)


def test_lmforge_qk_norm_model_exports_as_qwen3(tmp_path):
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64,
                      qk_norm=True, norm_eps=1e-6)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.q_norm.weight.uniform_(0.5, 1.5)
            layer.attention.k_norm.weight.uniform_(0.5, 1.5)
    save_model_dir(model, tmp_path / "lm")
    s = export_hf(tmp_path / "lm", tmp_path / "out")
    assert s["family"] == "qwen3"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model.eval()(x), atol=ATOL, rtol=0)
    with pytest.raises(UserError, match="has no QK-norm; export this model as qwen3"):
        export_hf(tmp_path / "lm", tmp_path / "out2", family="llama")


def test_chat_template_and_tokenizer_carried_over(hf_dir, tmp_path, make_tokenizer):
    make_tokenizer(tmp_path, [f"line {i} of the tiny corpus, words and more words" for i in range(50)],
                             vocab_size=300)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"),
                                               eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TEMPLATE
    src = hf_dir(make_qwen3("qwen3-gqa-untied", vocab_size=len(tok)))
    tok.save_pretrained(src)
    import_hf(src, tmp_path / "lm")
    export_hf(tmp_path / "lm", tmp_path / "out")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.chat_template == TEMPLATE
    msgs = [{"role": "user", "content": "hi there"}]
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3"


def test_unsupported_qwen3_configs_are_clear_errors(hf_dir, tmp_path):
    for kw, match in (({"attention_bias": True}, "attention_bias=true"),
                      ({"use_sliding_window": True, "sliding_window": 8}, "use_sliding_window=true")):
        src = hf_dir(make_qwen3("qwen3-gqa-untied", **kw), name=f"hf_{next(iter(kw))}")
        with pytest.raises(UserError, match=match):
            import_hf(src, tmp_path / f"lm_{next(iter(kw))}")


@pytest.mark.parametrize(("preset", "hf_kw"), [
    ("qwen3-0.6b", {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}),
    ("qwen3-8b", {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False})])
def test_presets_count_what_transformers_builds(preset, hf_kw):
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_kw))
    assert sum(p.numel() for p in hf.parameters()) == get_preset(preset).num_params() == PUBLISHED_PARAMS[preset]
    from lmforge.artifacts.hf.families import hf_to_model_config

    assert hf_to_model_config({**hf_kw, "model_type": "qwen3", "rope_theta": 1000000.0,
                               "max_position_embeddings": 40960}) == get_preset(preset)


def test_metadata_records_qwen3(hf_dir, tmp_path):
    import_hf(hf_dir(make_qwen3("qwen3-mha-tied")), tmp_path / "lm")
    assert read_metadata(tmp_path / "lm").hf["family"] == "qwen3"
    assert any(k.endswith("attention.q_norm.weight") for k in load_weights(tmp_path / "lm"))
