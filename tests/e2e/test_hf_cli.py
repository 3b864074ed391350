"""`lmforge import` / `lmforge export` end to end: weights, config and tokenizer files in both directions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lmforge.artifacts import read_metadata
from tests.conftest import TEST_DATA

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "To be or not to be, that is the question. All that glitters is not gold. ") * 8
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=ENV, check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def _hf_tokenizer(path, corpus=None):
    """A byte-level BPE tokenizer written the way transformers writes one (tokenizer_config + chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus or [TEXT], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="</s>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    return fast


@pytest.mark.slow
def test_import_generate_export_round_trip_with_tokenizer(tmp_path):
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.tokenizer.core import load_tokenizer

    src = tmp_path / "hf"
    fast = _hf_tokenizer(src)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()
    hf.save_pretrained(src)

    s = json.loads(cli("import", "--hf", src, "--out", tmp_path / "lm", "--json").stdout)
    assert s["family"] == "llama" and "tokenizer.json" in s["tokenizer"]["files"] and s["tokenizer"]["chat_template"]
    tok = load_tokenizer(tmp_path / "lm")
    text = "To be or not to be, a journey."
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False)
    assert tok.eos_id == fast.eos_token_id and tok.chat_template == TEMPLATE

    g = json.loads(cli("generate", "--model", tmp_path / "lm", "--prompt", "The quick", "--max-new-tokens", 6,
                       "--json").stdout)
    assert len(g["completions"]) == 1

    r = cli("export", "--model", tmp_path / "lm", "--format", "hf", "--out", tmp_path / "out")
    assert r.stdout.startswith("exported LlamaForCausalLM") and len(r.stdout.strip().splitlines()) == 1
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert back_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    x = torch.tensor([fast.encode(text)])
    lm = load_model_dir(tmp_path / "lm").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(lm(x), hf(x).logits, atol=1e-5, rtol=0)


def test_export_of_a_model_lmforge_trained(tmp_path):
    """A model lmforge built (tiny preset, lmforge's own BPE tokenizer) → transformers loads both."""
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT + "中文的句子也在这里。")
    tok = train_tokenizer([str(corpus)], 300, tmp_path / "tok", progress=False)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size), seed=0).eval()
    save_model_dir(model, tmp_path / "model", tokenizer_dir=str(tmp_path / "tok"))
    s = json.loads(cli("export", "--model", tmp_path / "model", "--out", tmp_path / "out", "--json").stdout)
    assert s["architecture"] == "LlamaForCausalLM" and s["family"] == "llama"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "A journey of a thousand miles. 中文的句子"
    ids = tok.encode(text)
    assert back_tok.encode(text, add_special_tokens=False) == ids
    assert back_tok.decode(ids) == text
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_id and cfg["tie_word_embeddings"] is True
    msgs = [{"role": "user", "content": "hi"}]
    from lmforge.tokenizer.chat_template import render_generation_prompt

    assert back_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        render_generation_prompt(tok, msgs)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, model(x), atol=1e-5, rtol=0)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.cli import main
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    def err(*args):
        assert main([str(a) for a in args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("error: ") and "Traceback" not in "".join(lines)
        return lines[-1]

    (tmp_path / "empty").mkdir()
    assert "config.json" in err("import", "--hf", tmp_path / "empty", "--out", tmp_path / "lm")
    hf_like = tmp_path / "hfdir"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "is a Hugging Face model dir" in err("export", "--model", hf_like, "--out", tmp_path / "out")
    save_model_dir(build_model(get_preset("transformer-base", vocab_size=64, dim=32, n_layers=1, n_heads=2,
                                          ffn_hidden=64, max_seq_len=16), seed=0), tmp_path / "sin")
    assert "no Hugging Face equivalent" in err("export", "--model", tmp_path / "sin", "--out", tmp_path / "out")
    assert "is not a size" in err("export", "--model", tmp_path / "sin", "--out", tmp_path / "out",
                                  "--max-shard-size", "lots")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_import_finetune_export(tmp_path):
    """The README's flow: a HF checkpoint → lmforge SFT → back to transformers."""
    import lmforge.cli.finetune  # noqa: F401 (part of lmforge: an import error must fail, not skip)

    alpaca = TEST_DATA / "translation_en_zh_tatoeba" / "derived" / "alpaca_translate.json"
    src = tmp_path / "hf"
    fast = _hf_tokenizer(src)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)).eval()
    base.save_pretrained(src)
    cli("import", "--hf", src, "--out", tmp_path / "lm")
    (tmp_path / "sft.yaml").write_text("finetune:\n  mode: sft\n")
    r = json.loads(cli("finetune", "--config", tmp_path / "sft.yaml", f"model.from={tmp_path / 'lm'}",
                       f"data.train=[{alpaca}]", "data.seq_len=128", "data.max_train_examples=200",
                       "train.max_steps=6", "train.global_batch=8", "train.micro_batch=8", "train.threads=1",
                       f"run.dir={tmp_path / 'run'}", "optim.lr=1e-3", "eval.batches=2", "--json").stdout)
    assert r["step"] == 6
    cli("export", "--model", tmp_path / "run" / "model", "--out", tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    from lmforge.artifacts.model_dir import load_model_dir

    tuned = load_model_dir(tmp_path / "run" / "model").eval()
    x = torch.tensor([tok.encode("A journey of a thousand miles", add_special_tokens=False)])
    with torch.no_grad():
        # the import is the base model; the export is the fine-tuned lmforge model, which is not the base
        torch.testing.assert_close(load_model_dir(tmp_path / "lm").eval()(x), base(x).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(x).logits, tuned(x), atol=1e-5, rtol=0)
        assert (back(x).logits - base(x).logits).abs().max() > 1e-2
    # full SFT trained every tensor: each exported tensor moved from the base's (the embedding only in the rows
    # of the tokens the training data holds: no weight decay on embeddings)
    trained, start = back.state_dict(), base.state_dict()
    assert trained.keys() == start.keys()
    for k in start:
        assert not torch.equal(trained[k], start[k]), f"{k} is the base's"
    emb = "model.embed_tokens.weight"
    moved = (trained[emb] - start[emb]).abs().amax(-1) > 0
    assert moved.sum() > len(fast) // 4, int(moved.sum())
    assert tok.eos_token_id == 2 and tok.chat_template == TEMPLATE

    # identity: the import and the fine-tune record the tokenizer's hash; a swapped tokenizer.json is refused
    from lmforge.tokenizer.core import load_tokenizer

    want = load_tokenizer(tmp_path / "lm").hash
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["lmforge"]["tokenizer_hash"] == want
    assert read_metadata(tmp_path / "run" / "model").tokenizer_hash == want
    other = tmp_path / "other"
    _hf_tokenizer(other, corpus=["completely different words, other merges"] * 50)
    (tmp_path / "run" / "model" / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    r = cli("generate", "--model", tmp_path / "run" / "model", "--prompt", "A journey", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "not the ones its weights" in r.stderr
