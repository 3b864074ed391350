"""Tokenizer: BPE training on real EN + ZH text, round trip, specials, HF loading, SentencePiece, hash."""

import json

import pytest

from lmforge.config import UserError
from lmforge.tokenizer.core import SPECIAL_TOKENS, load_tokenizer
from lmforge.tokenizer.train import train_tokenizer
from tests.conftest import TEST_DATA

SHAKESPEARE = TEST_DATA / "tinyshakespeare" / "input.txt"
LUNYU = TEST_DATA / "chinese_poetry" / "classics" / "lunyu.json"
SONGCI = TEST_DATA / "chinese_poetry" / "songci" / "ci.song.0.json"

MIXED_TEXT = [
    "子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？”",
    "To be, or not to be: that is the question.\r\n\tWhether 'tis nobler…",
    "混合 mixed 文本 with numbers 1234567 and emoji 🤖🚀, tabs\t\tand  double  spaces  ",
    "日本語のテキストも、ひらがな・カタカナで。 한국어 텍스트도. Ünïcödé ß ø",
    "\x00control\x07chars\u200b and <|eos without its bar",
    "",
    " ",
    "\n\n\n",
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "mixed"
    return train_tokenizer([str(SHAKESPEARE), str(LUNYU), str(SONGCI)], 2048, out, text_field="paragraphs",
                           progress=False)


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "english"
    return train_tokenizer([str(SHAKESPEARE)], 2048, out, progress=False)


def test_round_trip_is_exact(mixed):
    for text in MIXED_TEXT:
        ids = mixed.encode(text)
        assert mixed.decode(ids) == text
    batch = mixed.encode_batch(MIXED_TEXT)
    assert [mixed.decode(ids) for ids in batch] == MIXED_TEXT
    # a special token's string in the text becomes its id; decode(skip_special_tokens=False) restores it
    ids = mixed.encode("a <|eos|> b")
    assert mixed.eos_id in ids and mixed.decode(ids, skip_special_tokens=False) == "a <|eos|> b"


def test_special_tokens_and_ids(mixed):
    assert mixed.vocab_size == 2048
    assert [mixed.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (mixed.pad_id, mixed.bos_id, mixed.eos_id) == (0, 1, 2)
    assert {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(mixed.special_tokens)
    ids = mixed.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and mixed.decode(ids) == "hello"
    assert mixed.decode(ids, skip_special_tokens=False) == "<|bos|>hello<|eos|>"
    assert mixed.chat_template and "<|assistant|>" in mixed.chat_template


def test_chinese_is_not_shredded_into_bytes(mixed, english):
    text = "".join(json.loads(LUNYU.read_text())[0]["paragraphs"])
    zh_mixed = len(mixed.encode(text))
    zh_english = len(english.encode(text))
    n_bytes = len(text.encode())
    # CJK runs are pre-tokenized apart from Latin words, and frequent characters become single tokens
    assert n_bytes / zh_mixed > 2.5 and len(text) / zh_mixed > 0.85
    assert zh_english > 1.8 * zh_mixed
    for ch in "子曰不之人":
        assert len(mixed.encode(ch)) == 1, ch
    assert mixed.backend.pre_tokenizer.pre_tokenize_str("中文abc")[0][0] != mixed.backend.pre_tokenizer \
        .pre_tokenize_str("中文abc")[-1][0]


def test_save_load_hash_and_transformers(mixed, tmp_path):
    mixed.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.hash == mixed.hash and again.hash.startswith("sha256:")
    assert again.chat_template == mixed.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    transformers = pytest.importorskip("transformers")
    text = MIXED_TEXT[2]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "copy" / "tokenizer.json"))
    assert fast.encode(text) == mixed.encode(text)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert auto.encode(text, add_special_tokens=False) == mixed.encode(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)
    chat = auto.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                    add_generation_prompt=True)
    assert chat == "<|user|>\n你好<|end|>\n<|assistant|>\n"


def test_hash_differs_between_tokenizers(mixed, english):
    assert mixed.hash != english.hash


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", bos_id=1, eos_id=2, pad_id=3, unk_id=0,
                                   minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 300
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "First Citizen: Before we proceed any further, hear me speak."
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text + "</s>"
    assert tok.encode_batch([text, "speak"])[0] == ids[1:-1]
    assert tok.hash.startswith("sha256:") and tok.token_to_id("<s>") == 1 and tok.token_to_id("§§nope") is None
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").hash == tok.hash


def test_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "a.txt").write_text("some text " * 20)
    with pytest.raises(UserError, match="--vocab-size=100 must be between"):
        train_tokenizer([str(tmp_path / "a.txt")], 100, None, progress=False)
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(UserError, match="hold no text"):
        train_tokenizer([str(tmp_path / "empty.txt")], 300, None, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        train_tokenizer([str(tmp_path / "nope.txt")], 300, None, progress=False)
