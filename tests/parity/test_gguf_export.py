"""GGUF export: the file loads back in transformers (`from_pretrained(dir, gguf_file=...)`) with the same
logits, its metadata reads back with gguf's own reader, and its tokenizer tokenizes like lmforge's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

from lmforge.artifacts.gguf import export_gguf
from lmforge.artifacts.gguf.tensors import halves_to_pairs, pairs_to_halves, rope_freq_factors
from lmforge.artifacts.model_dir import save_model_dir
from lmforge.config import UserError
from lmforge.models.config import ModelConfig, RopeScaling
from lmforge.models.positional import rope_inv_freq
from lmforge.models.transformer import build_model
from lmforge.tokenizer.chat_template import uses_bos
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.llama_cpp import PRE_TOKENIZERS, ollama_template

CORPUS = ["The quick brown fox jumps over the lazy dog, 12345 times.", "中文abc 你好，世界。我们在学习。",
          "To be or not to be: that is the question!", "(中文) mixed 文本 with numbers 2024 and 3.14159."] * 20
TEXTS = ["The quick brown fox jumps over 1234567 dogs.", "中文abc 你好，世界。", "(中文) mixed 文本\n\n  spaces  ",
         "naïve café, e\u0301 and ß", "<|user|>\nhi<|end|>\n"]
SHAPES = {
    "llama-gqa": {"n_kv_heads": 2},
    "qwen2-tied": {"n_kv_heads": 1, "qkv_bias": True, "tie_embeddings": True},
}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, make_tokenizer):
    root = tmp_path_factory.mktemp("gguf")
    make_tokenizer(root, CORPUS, vocab_size=330, name="tok")
    dirs = {}
    for i, (name, kw) in enumerate(SHAPES.items()):
        cfg = ModelConfig(vocab_size=340, dim=64, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=128, **kw)
        model = build_model(cfg, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # fresh norms are all ones and biases zero: a swapped tensor would hide
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        dirs[name] = save_model_dir(model, root / name, tokenizer_dir=str(root / "tok"))
    return dirs


def _export(model_dir, out, dtype):
    tok = load_tokenizer(model_dir)
    return export_gguf(model_dir, out, dtype, tok, add_bos=uses_bos(tok), extra_pre=PRE_TOKENIZERS,
                       ollama_template=ollama_template(tok.chat_template))


def _logits_both(model_dir, out, dtype):
    from lmforge.artifacts.model_dir import load_model_dir

    ours = load_model_dir(model_dir).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f"model-{dtype}.gguf",
                                                               dtype=torch.float32).eval()
    x = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return ours(x), theirs(x).logits, theirs


@pytest.mark.parametrize("shape", list(SHAPES))
def test_f32_gguf_loads_in_transformers_with_the_same_logits(model_dirs, tmp_path, shape):
    s = _export(model_dirs[shape], tmp_path / "out", "f32")
    assert s["architecture"] == ("qwen2" if shape.startswith("qwen2") else "llama")
    ours, theirs, hf = _logits_both(model_dirs[shape], tmp_path / "out", "f32")
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if shape.startswith("qwen2") else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == shape.endswith("tied")
    assert (ours - theirs).abs().max().item() < 1e-4


# Measured on these models (logits within about ±1.5): f16 max |Δ| 1.9e-4, q8_0 max |Δ| 6.1e-3.
@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("q8_0", 3e-2)])
def test_f16_and_q8_0_logits_within_stated_tolerance(model_dirs, tmp_path, dtype, tol):
    s = _export(model_dirs["llama-gqa"], tmp_path / "out", dtype)
    assert s["tensor_types"] == {dtype: 16, "f32": 5}  # 2-D matrices quantized, norms kept f32
    ours, theirs, _ = _logits_both(model_dirs["llama-gqa"], tmp_path / "out", dtype)
    diff = (ours - theirs).abs().max().item()
    assert 0 < diff < tol
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_metadata_and_tensors_read_back_with_gguf_reader(model_dirs, tmp_path):
    from gguf import GGUFReader

    d = model_dirs["llama-gqa"]
    _export(d, tmp_path / "out", "f32")
    r = GGUFReader(str(tmp_path / "out" / "model-f32.gguf"))

    def field(key):
        return r.fields[key].contents()

    tok = load_tokenizer(d)
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == 0
    assert (field("llama.context_length"), field("llama.embedding_length"), field("llama.block_count")) == (128, 64, 2)
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.feed_forward_length") == 96 and field("llama.rope.dimension_count") == 16
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "smaug-bpe"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 340  # padded to the model's vocab_size
    assert tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[-1] == "[PAD339]" and field("tokenizer.ggml.token_type")[-1] == 5
    assert field("tokenizer.ggml.token_type")[tok.bos_id] == 3  # control
    merges = json.loads((d / "tokenizer.json").read_text())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_id and field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert field("tokenizer.chat_template") == tok.chat_template
    assert field("tokenizer.ggml.add_bos_token") is False
    # q/k rows are stored in llama.cpp's interleaved RoPE order; v as it is
    from lmforge.artifacts.model_dir import load_weights

    sd = load_weights(d)
    stored = {t.name: np.array(t.data) for t in r.tensors}
    assert np.array_equal(stored["blk.1.attn_q.weight"], halves_to_pairs(sd["layers.1.attention.wq.weight"], 4).numpy())
    assert np.array_equal(stored["blk.1.attn_k.weight"], halves_to_pairs(sd["layers.1.attention.wk.weight"], 2).numpy())
    assert np.array_equal(stored["blk.1.attn_v.weight"], sd["layers.1.attention.wv.weight"].numpy())
    assert not np.array_equal(stored["blk.1.attn_q.weight"], sd["layers.1.attention.wq.weight"].numpy())
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f32.gguf\nTEMPLATE \"\"\"{{- range .Messages }}<|{{ .Role }}|>\n")
    assert 'PARAMETER stop "<|end|>"' in modelfile and 'PARAMETER stop "<|eos|>"' in modelfile


def test_tokenizer_rebuilt_from_gguf_tokenizes_like_lmforge(model_dirs, tmp_path):
    d = model_dirs["llama-gqa"]
    _export(d, tmp_path / "out", "f32")
    ours = load_tokenizer(d)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file="model-f32.gguf")
    for text in TEXTS + CORPUS[:4]:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert theirs.decode(ours.encode("中文abc 你好")) == "中文abc 你好"
    assert (theirs.bos_token, theirs.eos_token) == (ours.bos_token, ours.eos_token)


def test_rope_halves_to_pairs_is_llama_cpp_order_and_invertible():
    t = torch.arange(8.0)  # one head of 8: halves [0 1 2 3 | 4 5 6 7] -> pairs (0,4) (1,5) (2,6) (3,7)
    assert halves_to_pairs(t, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = torch.randn(4 * 16, 24)
    assert torch.equal(pairs_to_halves(halves_to_pairs(w, 4), 4), w)


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, make_tokenizer):
    cfg = ModelConfig(vocab_size=340, dim=64, n_layers=1, n_heads=4, ffn_hidden=96, max_seq_len=128,
                      rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
    factors = rope_freq_factors(cfg)
    base = rope_inv_freq(ModelConfig(vocab_size=340, dim=64, n_layers=1, n_heads=4, rope_theta=500000.0))
    assert torch.allclose(base / factors, rope_inv_freq(cfg))  # llama.cpp: theta_i / factor_i
    assert factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and factors[-1] == 8.0  # high, smoothed, low freq
    make_tokenizer(tmp_path, CORPUS, vocab_size=330, name="tok")
    d = save_model_dir(build_model(cfg, seed=0), tmp_path / "m", tokenizer_dir=str(tmp_path / "tok"))
    _export(d, tmp_path / "out", "f16")
    r = gguf.GGUFReader(str(tmp_path / "out" / "model-f16.gguf"))
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert np.allclose(np.array(t.data), factors.numpy())


def test_shapes_without_a_gguf_graph_are_refused(tmp_path, make_tokenizer):
    make_tokenizer(tmp_path, CORPUS, vocab_size=330, name="tok")
    cases = {"gpt2": {"pos_encoding": "learned", "norm": "layernorm", "activation": "gelu_tanh", "bias": True},
             "bias": {"bias": True}}
    for name, kw in cases.items():
        cfg = ModelConfig(vocab_size=340, dim=32, n_layers=1, n_heads=2, max_seq_len=64, **kw)
        d = save_model_dir(build_model(cfg, seed=0), tmp_path / name, tokenizer_dir=str(tmp_path / "tok"))
        with pytest.raises(UserError, match="--format hf"):
            _export(d, tmp_path / f"out-{name}", "f16")
        assert not (tmp_path / f"out-{name}").exists()


def test_cli_export_gguf_and_bad_dtype(model_dirs, tmp_path):
    d = model_dirs["qwen2-tied"]
    cmd = [sys.executable, "-m", "lmforge", "export", "--model", str(d), "--format", "gguf", "--dtype", "q8_0",
           "--out", str(tmp_path / "q8"), "--json"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["architecture"] == "qwen2" and s["dtype"] == "q8_0" and s["tensor_types"]["q8_0"] == 15  # tied: no output
    assert (tmp_path / "q8" / "model-q8_0.gguf").stat().st_size == s["bytes"]
    bad = subprocess.run([*cmd[:-2], str(tmp_path / "hf"), "--format", "hf"], check=False, capture_output=True,
                         text=True, timeout=300, env=ENV)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --dtype q8_0")
    assert "Traceback" not in bad.stderr and not (tmp_path / "hf").exists()


def test_pre_tokenizer_names_llama_cpp_knows():
    from lmforge.artifacts.gguf.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name
    from lmforge.tokenizer.train import PRETOKENIZE_PATTERN

    def tj(split=None, byte_regex=False, ignore_merges=False):
        steps = [{"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated"}] if split else []
        steps.append({"type": "ByteLevel", "add_prefix_space": False, "use_regex": byte_regex})
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
                "model": {"type": "BPE", "ignore_merges": ignore_merges}}

    assert pre_tokenizer_name(tj(LLAMA3_SPLIT, ignore_merges=True))[0] == "llama-bpe"  # Llama-3's tokenizer.json
    assert pre_tokenizer_name(tj(LLAMA3_SPLIT))[0] == "smaug-bpe"
    assert pre_tokenizer_name(tj(QWEN2_SPLIT))[0] == "qwen2"
    assert pre_tokenizer_name(tj(byte_regex=True))[0] == "gpt2"
    name, note = pre_tokenizer_name(tj(PRETOKENIZE_PATTERN), PRE_TOKENIZERS)
    assert name == "smaug-bpe" and "combining marks" in note
    for bad in (tj(PRETOKENIZE_PATTERN), tj(r"\p{L}+"), tj(QWEN2_SPLIT, byte_regex=True)):
        with pytest.raises(UserError, match="convert_hf_to_gguf"):
            pre_tokenizer_name(bad)


def test_gpt2_style_hf_tokenizer_round_trips_through_gguf(tmp_path):
    """A Hugging Face byte-level BPE with GPT-2's own split (what `lmforge import` brings in) -> pre 'gpt2'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(tmp_path / "tok")
    cfg = ModelConfig(vocab_size=304, dim=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=64)
    d = save_model_dir(build_model(cfg, seed=0), tmp_path / "m", tokenizer_dir=str(tmp_path / "tok"))
    s = _export(d, tmp_path / "out", "f32")
    assert s["tokenizer"]["pre"] == "gpt2" and s["tokenizer"]["special_ids"] == {"bos": 1, "eos": 2}
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"), gguf_file="model-f32.gguf")
    ours = load_tokenizer(d)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text
