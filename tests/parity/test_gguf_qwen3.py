"""GGUF export of Qwen3-shaped models (``model.qk_norm``) as llama.cpp's ``qwen3`` graph: transformers' GGUF
loader builds Qwen3ForCausalLM with lmforge's logits, and the gguf reader sees llama.cpp's names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from lmforge.artifacts.gguf import export_gguf
from lmforge.artifacts.model_dir import load_model_dir, load_weights, save_model_dir
from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model
from lmforge.tokenizer.chat_template import uses_bos
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.llama_cpp import PRE_TOKENIZERS, ollama_template

CORPUS = ["The quick brown fox jumps over the lazy dog, 12345 times.", "To be or not to be: that is it!"] * 30


def _model_dir(root, make_tokenizer, tie: bool, **kw):
    make_tokenizer(root, CORPUS, vocab_size=300, name="tok")
    # head_dim 128 as every published Qwen3: transformers' GGUF loader keeps Qwen3Config's default head_dim
    cfg = ModelConfig(vocab_size=310, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=128, ffn_hidden=96,
                      max_seq_len=128, qk_norm=True, norm_eps=1e-6, rope_theta=1000000.0, tie_embeddings=tie, **kw)
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # norms away from ones: a dropped or swapped q/k norm shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return save_model_dir(model, root / "m", tokenizer_dir=str(root / "tok"))


def _export(model_dir, out, dtype="f32"):
    tok = load_tokenizer(model_dir)
    return export_gguf(model_dir, out, dtype, tok, add_bos=uses_bos(tok), extra_pre=PRE_TOKENIZERS,
                       ollama_template=ollama_template(tok.chat_template))


@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_gguf_loads_in_transformers_with_the_same_logits(tmp_path, make_tokenizer, tie):
    d = _model_dir(tmp_path, make_tokenizer, tie)
    s = _export(d, tmp_path / "out")
    assert s["architecture"] == "qwen3"
    ours = load_model_dir(d).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="model-f32.gguf",
                                                               dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(0, 310, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-4


def test_qwen3_gguf_names_and_shapes_read_back(tmp_path, make_tokenizer):
    from gguf import GGUFReader

    d = _model_dir(tmp_path, make_tokenizer, tie=False)
    _export(d, tmp_path / "out")
    r = GGUFReader(str(tmp_path / "out" / "model-f32.gguf"))
    assert r.fields["general.architecture"].contents() == "qwen3"
    assert r.fields["qwen3.attention.key_length"].contents() == 128
    stored = {t.name: np.array(t.data) for t in r.tensors}
    sd = load_weights(d)
    for i in range(2):
        for part in ("q", "k"):
            assert np.array_equal(stored[f"blk.{i}.attn_{part}_norm.weight"],
                                  sd[f"layers.{i}.attention.{part}_norm.weight"].numpy())
        # halves-rotating (NEOX) graph: q/k rows stored as they are
        assert np.array_equal(stored[f"blk.{i}.attn_q.weight"], sd[f"layers.{i}.attention.wq.weight"].numpy())
    assert len(stored) == 3 + 2 * 11  # embeddings, final norm, head; 9 + q/k norms per layer


def test_qk_norm_with_qkv_bias_is_refused(tmp_path, make_tokenizer):
    d = _model_dir(tmp_path, make_tokenizer, tie=False, qkv_bias=True)
    with pytest.raises(UserError, match="qwen3 graph has no biases"):
        _export(d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
