"""A squared-ReLU model (``activation: relu2``, the quickstart's MLP) exports exactly: to Hugging Face as Arcee
(``ArceeForCausalLM``, Llama with a non-gated relu² MLP) with the same logits and generations, back by import
bit for bit, and to GGUF as llama.cpp's ``arcee`` graph with the tensors llama.cpp's own name map and q/k
permutation give the HF export (``transformers`` has no GGUF loader for arcee, so the file is checked
against the HF model it is equivalent to)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

from lmforge.artifacts.gguf import export_gguf
from lmforge.artifacts.gguf.tensors import halves_to_pairs
from lmforge.artifacts.hf.convert import export_hf, import_hf, read_hf_weights
from lmforge.artifacts.model_dir import load_model_dir, save_model_dir
from lmforge.config import UserError
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.llama_cpp import PRE_TOKENIZERS

CORPUS = ["def main():\n    return os.path.join(a, b)\n", "import sys\nfor i in range(10):\n    print(i)\n"] * 30
SHAPES = {
    "untied-gqa": {"n_kv_heads": 2},
    "tied-mha": {"tie_embeddings": True},
    "biases": {"bias": True},
}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=340, dim=64, n_layers=2, n_heads=4, ffn_hidden=96, max_seq_len=128,
                       activation="relu2", **kw)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, make_tokenizer):
    root = tmp_path_factory.mktemp("arcee")
    make_tokenizer(root, CORPUS, vocab_size=330, name="tok")
    dirs = {}
    for i, (name, kw) in enumerate(SHAPES.items()):
        model = build_model(_cfg(**kw), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # fresh norms are all ones and biases zero: a swapped tensor would hide
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        dirs[name] = save_model_dir(model, root / name, tokenizer_dir=str(root / "tok"))
    return dirs


@pytest.mark.parametrize("shape", list(SHAPES))
def test_relu2_exports_as_arcee_with_the_same_logits_and_imports_back_bit_for_bit(model_dirs, tmp_path, shape):
    d = model_dirs[shape]
    s = export_hf(d, tmp_path / "hf")
    assert (s["family"], s["architecture"]) == ("arcee", "ArceeForCausalLM")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "ArceeForCausalLM" and hf.config.hidden_act == "relu2"
    ours = load_model_dir(d).eval()
    x = torch.randint(0, 340, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.encode(CORPUS[0], add_special_tokens=False) == load_tokenizer(d).encode(CORPUS[0])
    # the token ids come from the tokenizer, never ArceeConfig's AFM defaults (128000 / 128001)
    assert hf.config.eos_token_id is None or hf.config.eos_token_id < 340
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert back["family"] == "arcee"
    again = load_model_dir(tmp_path / "back")
    assert again.cfg.activation == "relu2" and again.cfg.hidden_dim == 96
    theirs = again.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())


def test_greedy_generation_matches_transformers(model_dirs, tmp_path):
    from lmforge.generate.engine import generate

    d = model_dirs["untied-gqa"]
    export_hf(d, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ours = load_model_dir(d).eval()
    prompt = [5, 17, 42, 8]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, max_new_tokens=12, temperature=0.0) == theirs


def test_gguf_is_llama_cpp_arcee_of_the_hf_export(model_dirs, tmp_path):
    """The GGUF holds what llama.cpp's converter makes of the HF Arcee export: every HF tensor under the name
    gguf's own ARCEE tensor map gives it, q/k rows in llama.cpp's RoPE pair order, relu² hyper-parameters."""
    d = model_dirs["untied-gqa"]
    export_hf(d, tmp_path / "hf")
    tok = load_tokenizer(d)
    s = export_gguf(d, tmp_path / "gguf", "f32", tok, extra_pre=PRE_TOKENIZERS)
    assert s["architecture"] == "arcee"
    r = gguf.GGUFReader(str(tmp_path / "gguf" / "model-f32.gguf"))
    assert r.fields["general.architecture"].contents() == "arcee"
    assert r.fields["arcee.feed_forward_length"].contents() == 96
    assert r.fields["arcee.attention.head_count_kv"].contents() == 2
    assert r.fields["arcee.rope.dimension_count"].contents() == 16
    stored = {t.name: np.array(t.data) for t in r.tensors}
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.ARCEE, 2)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.ARCEE]}
    expected = {}
    for key, t in read_hf_weights(tmp_path / "hf").items():
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, key
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            t = halves_to_pairs(t, 4 if "q_proj" in key else 2)
        expected[name] = t.numpy()
    assert set(stored) == set(expected)
    assert {k.rsplit(".", 1)[0].replace(".0.", ".{bid}.").replace(".1.", ".{bid}.") for k in stored} <= allowed
    for name, want in expected.items():
        assert np.array_equal(stored[name], want), name
    assert "blk.0.ffn_up.weight" in stored and "blk.0.ffn_gate.weight" not in stored


def test_what_arcee_cannot_express_is_refused(tmp_path, make_tokenizer):
    make_tokenizer(tmp_path, CORPUS, vocab_size=330, name="tok")
    d = save_model_dir(build_model(_cfg(qkv_bias=True), seed=0), tmp_path / "qkv", tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(UserError, match="arcee has no q/k/v-only bias"):
        export_hf(d, tmp_path / "hf")
    with pytest.raises(UserError, match="arcee graph"):
        export_gguf(d, tmp_path / "gguf", "f16", load_tokenizer(d), extra_pre=PRE_TOKENIZERS)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "gguf").exists()
    d = save_model_dir(build_model(_cfg(qk_norm=True), seed=0), tmp_path / "qkn")
    with pytest.raises(UserError, match="model.qk_norm=true"):  # relu2 no longer refused, QK-norm still is
        export_hf(d, tmp_path / "hf")
