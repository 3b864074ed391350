"""BERT: the encoder, pooler and masked-LM head against `transformers`, and the seed's own example."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import V, make_bert
from safetensors.torch import load_file

from lmforge.artifacts.heads_dir import load_heads
from lmforge.artifacts.hf.convert import export_hf, import_hf
from lmforge.artifacts.model_dir import load_model_dir
from lmforge.models.heads import mlm_logits

transformers = pytest.importorskip("transformers")
ATOL = 1e-5

CORPUS = [
    "This is an example sentence.",
    "Each sentence is converted to tokens, and the encoder reads them in both directions.",
    "An example of a sentence embedding model is BERT.",
    "This sentence is another example; this is the last one.",
]


def _ids(seed=0, b=2, t=16):
    return torch.randint(5, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_encoder_hidden_states_and_pooler_equal_bert_model(hf_dir, tmp_path):
    hf = make_bert("BertModel")
    import_hf(hf_dir(hf), tmp_path / "lm")
    lm = load_model_dir(tmp_path / "lm").eval()
    heads = load_heads(tmp_path / "lm", lm.cfg)
    assert set(heads) == {"pooler"}
    x = _ids()
    types = torch.zeros_like(x)
    types[:, 9:] = 1
    attn = torch.ones_like(x)
    attn[1, 11:] = 0  # right padding in row 1
    with torch.no_grad():
        want = hf(x, attention_mask=attn, token_type_ids=types)
        h = lm.hidden_states(x, mask=attn.bool()[:, None, None, :], token_type_ids=types)
    torch.testing.assert_close(h[0], want.last_hidden_state[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(h[1, :11], want.last_hidden_state[1, :11], atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(heads["pooler"](h), want.pooler_output, atol=ATOL, rtol=0)


def test_masked_lm_logits_equal_and_round_trip(hf_dir, tmp_path):
    hf = make_bert("BertForMaskedLM", seed=1)
    src = hf_dir(hf)
    import_hf(src, tmp_path / "lm")
    lm = load_model_dir(tmp_path / "lm").eval()
    heads = load_heads(tmp_path / "lm", lm.cfg)
    x = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(mlm_logits(lm, heads["mlm"], x), hf(x).logits, atol=ATOL, rtol=0)
    export_hf(tmp_path / "lm", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    back = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=ATOL, rtol=0)


def test_legacy_gamma_beta_and_prefixed_checkpoints_import(tmp_path):
    """TF-converted checkpoints (BertForPreTraining) name norms gamma/beta and carry an NSP head."""
    from safetensors.torch import save_file

    hf = make_bert("BertForPreTraining", seed=2)
    src = tmp_path / "hf"
    hf.config.save_pretrained(src)
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
          for k, v in hf.state_dict().items()}
    save_file(sd, str(src / "model.safetensors"))
    summary = import_hf(src, tmp_path / "lm")
    assert set(summary["heads"]) == {"mlm", "pooler"}
    assert any(k.startswith("cls.seq_relationship") for k in summary["dropped"])
    lm = load_model_dir(tmp_path / "lm").eval()
    x = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(lm(x), hf.bert(x).last_hidden_state, atol=ATOL, rtol=0)


def _bert_tokenizer_dir(path):
    """A BERT WordPiece tokenizer trained locally on a few sentences, saved as HF files."""
    from tokenizers import BertWordPieceTokenizer
    from tokenizers.processors import BertProcessing

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(CORPUS * 4, vocab_size=V, min_frequency=1,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    # as in published BERT tokenizer.json files: [CLS] … [SEP] around every sequence
    tok._tokenizer.post_processor = BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    fast = transformers.BertTokenizerFast(tokenizer_object=tok._tokenizer, do_lower_case=True)
    fast.save_pretrained(path)
    return fast


def test_seed_example_sentence_end_to_end(tmp_path):
    """The seed's example: tokenize "This is an example sentence." with a BERT WordPiece tokenizer, run the
    imported encoder from its model dir, and get BertModel's last hidden states."""
    src = tmp_path / "hf"
    fast = _bert_tokenizer_dir(src)
    hf = make_bert("BertModel", seed=3, vocab_size=len(fast))
    hf.save_pretrained(src)
    import_hf(src, tmp_path / "lm")

    sentence = "This is an example sentence."
    want_ids = fast(sentence, return_tensors="pt")
    with torch.no_grad():
        want = hf(**want_ids).last_hidden_state

    lm = load_model_dir(tmp_path / "lm").eval()
    ids = _encode_with_lmforge_tokenizer(tmp_path / "lm", sentence)
    assert ids == want_ids["input_ids"][0].tolist()
    assert ids[0] == fast.cls_token_id and ids[-1] == fast.sep_token_id and len(ids) == 8
    with torch.no_grad():
        got = lm.hidden_states(torch.tensor([ids]))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _encode_with_lmforge_tokenizer(model_dir, text):
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(model_dir)  # BOS/EOS resolve to [CLS]/[SEP] for a BERT vocabulary
    return tok.encode(text, add_bos=True, add_eos=True)
