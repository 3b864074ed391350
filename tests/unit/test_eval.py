"""Evaluation runners and data readers: perplexity, prompts, batched generation, label scoring."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import UserError
from lmforge.data.records import DataError
from lmforge.eval.datasets import load_qa, load_summarization, load_translation, read_texts, subset
from lmforge.eval.perplexity import perplexity, token_stream
from lmforge.eval.tasks import (
    PromptBuilder,
    classify_with_head,
    fill,
    generate_answers,
    label_loglikelihoods,
    postprocess,
    zero_shot_classify,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "Question: what is two plus two? Answer: four. Passage: the cat sat on the mat.",
    "今天天气很好，我们去公园散步吧。你好，世界！机器学习很有趣。",
    "Translate the following English text into Chinese: I like apples. 我喜欢苹果。",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS)


@pytest.fixture(scope="module")
def model():
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=64, tie_embeddings=True)
    return build_model(cfg, seed=0).eval()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- perplexity ---------------------------------------------------------------------------------
def test_token_stream_scores_documents_not_separators(tok):
    ids, scored = token_stream(tok, ["hello there", "the dog"])
    assert ids[0] == tok.eos_id and not scored[0]
    sep = ids.index(tok.eos_id, 1)
    assert not scored[sep] and all(scored[1:sep]) and all(scored[sep + 1:])
    assert tok.decode(ids) == "hello therethe dog"


@pytest.mark.parametrize("seq_len", [64, 7])
def test_perplexity_matches_direct_computation(tok, model, seq_len):
    texts = ["The quick brown fox jumps over the lazy dog.", "你好，世界！", "Hello there, how are you today?"]
    ids, scored = token_stream(tok, texts)
    # reference: each token predicted once, from a window of at most seq_len tokens starting at k*seq_len
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, seq_len):
            x = torch.tensor([ids[s:s + seq_len]])
            y = torch.tensor(ids[s + 1:s + 1 + seq_len])
            logp = F.log_softmax(model(x)[0, :len(y)], -1)
            for t, target in enumerate(y.tolist()):
                if scored[s + 1 + t]:
                    nll -= float(logp[t, target])
    n = sum(scored)
    got = perplexity(model, tok, texts, seq_len=seq_len, batch_size=2)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)


def test_perplexity_uses_the_chunked_loss_not_the_full_logits(tok, model, monkeypatch):
    """Chunks of 5 positions give the numbers of the whole batch at once (chunk=0), and the LM head only
    ever sees 5 positions: the model's full (B, T, V) logits are never computed."""
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?"] * 3
    whole = perplexity(model, tok, texts, seq_len=16, batch_size=4, chunk=0)
    rows = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda h: rows.append(h.shape[:-1]) or real(h))
    got = perplexity(model, tok, texts, seq_len=16, batch_size=4, chunk=5)
    assert rows and all(len(r) == 1 and r[0] <= 5 for r in rows), rows  # (n <= 5, dim) each, never (B, T, dim)
    assert got["tokens"] == whole["tokens"]
    assert got["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)


def test_perplexity_errors(tok, model):
    with pytest.raises(UserError, match="max_seq_len=64"):
        perplexity(model, tok, ["abc"], seq_len=65)
    with pytest.raises(UserError, match="fewer than 2 tokens"):
        perplexity(model, tok, [""])


def test_read_texts(tmp_path):
    assert read_texts(write(tmp_path / "a.txt", "one\ntwo\n")) == ["one\ntwo\n"]
    paras = write(tmp_path / "p.txt", "one\ntwo\n\n\nthree\n")
    assert read_texts(paras, txt_mode="blank") == ["one\ntwo", "three"]
    assert read_texts(paras, txt_mode="line") == ["one", "two", "three"]
    assert read_texts(write(tmp_path / "a.jsonl", '{"text": "x"}\n"y"\n{"text": ["a", "b"]}\n')) == ["x", "y", "a b"]
    with pytest.raises(DataError, match=r"b\.jsonl:2: record has no 'text' field"):
        read_texts(write(tmp_path / "b.jsonl", '{"text": "x"}\n{"body": "y"}\n'))
    with pytest.raises(DataError, match="empty"):
        read_texts(write(tmp_path / "e.txt", "  \n"))


# ---- data readers --------------------------------------------------------------------------------
def test_load_qa_formats(tmp_path):
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "q2", "question": "?", "answers": []}]}]}]}
    ex = load_qa(write(tmp_path / "s.json", json.dumps(squad)))
    assert len(ex) == 1 and ex[0].fields == {"context": "Paris is in France.", "question": "Where is Paris?"}
    assert ex[0].references == ["France"] and ex[0].id == "q1"
    nq = load_qa(write(tmp_path / "nq.jsonl", '{"question": "who?", "answer": ["Bob", "Robert"]}\n'))
    assert nq[0].fields == {"question": "who?"} and nq[0].references == ["Bob", "Robert"]
    gen = load_qa(write(tmp_path / "g.jsonl", '{"question": "q", "context": "c", "answers": "a"}\n'))
    assert gen[0].fields["context"] == "c" and gen[0].references == ["a"]
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a QA record needs a question"):
        load_qa(write(tmp_path / "bad.jsonl", '{"question": "q", "answer": "a"}\n{"q2": 1}\n'))


def test_load_summarization_and_translation(tmp_path):
    s = load_summarization(write(tmp_path / "s.jsonl", json.dumps(
        {"source": ["First sentence.", "Second one."], "target": ["tl;dr one", "tl;dr two"]}) + "\n"))
    assert s[0].fields["source"] == "First sentence. Second one." and len(s[0].references) == 2
    with pytest.raises(DataError, match=r"t\.jsonl:1: a summarization record needs"):
        load_summarization(write(tmp_path / "t.jsonl", '{"x": 1}\n'))
    tsv = write(tmp_path / "cmn.txt", "Hi.\t嗨。\tCC-BY\nHi.\t你好。\tCC-BY\nRun.\t你用跑的。\tCC-BY\n")
    ex, src, tgt = load_translation(tsv)
    assert (src, tgt) == ("en", "zh") and len(ex) == 2
    assert ex[0].fields == {"source": "Hi."} and ex[0].references == ["嗨。", "你好。"]
    rev, src, tgt = load_translation(tsv, reverse=True)
    assert (src, tgt) == ("zh", "en") and rev[0].references == ["Hi."] and len(rev) == 3
    jl = write(tmp_path / "p.jsonl", '{"en": "cat", "de": "Katze"}\n')
    ex, src, tgt = load_translation(jl, "en", "de")
    assert ex[0].fields["source"] == "cat" and ex[0].references == ["Katze"]
    with pytest.raises(DataError, match=r"bad\.tsv:2: expected source<TAB>target"):
        load_translation(write(tmp_path / "bad.tsv", "a\tb\nc\n"))


def test_subset():
    assert subset(list(range(10)), 3) == [0, 1, 2]
    assert subset(list(range(10)), 3, "spread") == [0, 3, 6]
    assert subset([1, 2], 5) == [1, 2]


def test_real_eval_files(real_data):
    # counts read independently of the loaders: the raw JSON / lines of each vendored slice
    squad_file = real_data / "qa_en_squad_v1.1_dev" / "squad_v1.1_dev_reconstructed.json"
    squad_raw = json.loads(squad_file.read_text(encoding="utf-8"))
    n_questions = sum(len(p["qas"]) for a in squad_raw["data"] for p in a["paragraphs"])
    squad = load_qa(squad_file)
    assert len(squad) == n_questions == 250
    nq_file = real_data / "qa_en_nq_open" / "NQ-open.dev.jsonl"
    assert len(load_qa(nq_file)) == len(nq_file.read_text(encoding="utf-8").splitlines()) == 300
    sci_file = real_data / "summarization_en_scitldr" / "test.jsonl"
    scitldr = load_summarization(sci_file)
    assert len(scitldr) == 40 and all(len(e.references) >= 1 for e in scitldr)
    assert scitldr[0].references == json.loads(sci_file.read_text(encoding="utf-8").splitlines()[0])["target"]
    tatoeba = real_data / "translation_en_zh_tatoeba" / "cmn.txt"
    rows = [ln.split("\t") for ln in tatoeba.read_text(encoding="utf-8").splitlines()]
    pairs, src, tgt = load_translation(tatoeba)
    assert (src, tgt) == ("en", "zh") and len(pairs) == len({r[0] for r in rows})  # distinct English sentences
    assert sum(len(e.references) for e in pairs) == len(rows) == 600  # repeated sources: multi-reference


# ---- prompts and generation ------------------------------------------------------------------------
def test_fill_and_postprocess():
    assert fill("Q: {question}", {"question": "why?"}) == "Q: why?"
    with pytest.raises(UserError, match=r"uses \{answer\}"):
        fill("{answer}", {"question": "q"})
    assert postprocess("qa", "\n Paris \nmore text") == "Paris"
    assert postprocess("summarize", "One line.\nStill.\n\nNext para") == "One line.\nStill."


def test_prompt_builder_shortens_the_long_field(tok):
    from lmforge.eval.datasets import GenExample

    ex = GenExample({"context": "the lazy dog " * 200, "question": "Where is the fox?"}, ["here"])
    base = len(PromptBuilder(tok, "qa", 10_000)(GenExample({**ex.fields, "context": ""}, []))[0])
    build = PromptBuilder(tok, "qa", max_prompt_tokens=base + 20)
    ids, cut = build(ex)
    assert cut and base + 15 <= len(ids) <= base + 20
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|user|>\nAnswer the question using the passage.")
    assert text.endswith("Question: Where is the fox?<|end|>\n<|assistant|>\n")
    short = GenExample({"question": "Where is the fox?"}, ["here"])
    ids, cut = build(short)
    assert not cut and "Passage" not in tok.decode(ids)
    raw = PromptBuilder(tok, "qa", base, chat=False)(short)[0]
    assert tok.decode(raw, skip_special_tokens=False).startswith("Answer the question with")


def test_batched_generation_equals_one_by_one(tok, model):
    prompts = [tok.encode(t) for t in ["Hello there", "今天天气", "The quick brown fox jumps", "Q"]]
    batched = generate_answers(model, tok, prompts, 6, batch_size=3, seed=0)
    single = [generate_answers(model, tok, [p], 6, batch_size=1, seed=0)[0] for p in prompts]
    assert batched == single
    sampled = [generate_answers(model, tok, prompts, 6, 2, seed=5, temperature=1.0) for _ in range(2)]
    assert sampled[0] == sampled[1]  # deterministic for a fixed seed


# ---- classification ---------------------------------------------------------------------------------
def test_label_loglikelihoods_match_single_forward(tok, model):
    prompts = [tok.encode("The quick brown fox\nAnswer:"), tok.encode("你好\nAnswer:")]
    conts = [tok.encode(" positive"), tok.encode(" no")]
    got = label_loglikelihoods(model, prompts, conts, batch_size=2)
    for n, p in enumerate(prompts):
        for k, c in enumerate(conts):
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([p + c]))[0], -1)
            want = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
            assert got[n][k] == pytest.approx(want, abs=1e-4)
    preds = zero_shot_classify(model, tok, ["The quick brown fox", "你好"], ["positive", "no"], 2)
    assert preds == [max(range(2), key=lambda k: got[i][k]) for i in range(2)]
    with pytest.raises(UserError, match="same tokens"):
        zero_shot_classify(model, tok, ["x"], ["yes", "yes"], 2)


def test_classify_with_head_ignores_padding(tok, model):
    from lmforge.models.classifier import SequenceClassifier

    clf = SequenceClassifier(model, 3, "last").eval()
    ids = [tok.encode("hello there"), tok.encode("the quick brown fox jumps over"), tok.encode("你好")]
    preds = classify_with_head(clf, ids, batch_size=3, pad_id=tok.pad_id)
    with torch.no_grad():
        single = [int(clf(torch.tensor([x])).argmax(-1)) for x in ids]
    assert preds == single


def test_summarization_tables_and_fields(tmp_path):
    tsv = tmp_path / "s.tsv"
    tsv.write_text("id\tarticle\thighlights\n1\tThe cat sat on the mat.\tA cat sat.\n2\tDogs bark.\tBarking.\n")
    ex = load_summarization(tsv)  # header names found among the usual ones
    assert [(e.fields["source"], e.references) for e in ex] == [("The cat sat on the mat.", ["A cat sat."]),
                                                               ("Dogs bark.", ["Barking."])]
    csv_file = tmp_path / "s.csv"
    csv_file.write_text('body,short\n"A long, quoted text.",Short one.\n')
    with pytest.raises(DataError, match=r"s\.csv:1: header has no column .source/document.*\(columns: body, short\); set --source"):
        load_summarization(csv_file)
    ex = load_summarization(csv_file, "body", "short")
    assert ex[0].fields["source"] == "A long, quoted text." and ex[0].references == ["Short one."]
    bare = tmp_path / "bare.tsv"
    bare.write_text("Text one.\tSum one.\nText two.\tSum two.\n")
    assert [e.references for e in load_summarization(bare, "0", "1")] == [["Sum one."], ["Sum two."]]
    jl = tmp_path / "s.jsonl"
    jl.write_text('{"doc": "Some text.", "abstract_short": "Text."}\n')
    assert load_summarization(jl, "doc", "abstract_short")[0].references == ["Text."]
    other = tmp_path / "s.txt"
    other.write_text("anything\n")
    with pytest.raises(DataError, match=r"must be one of \.jsonl, \.json, \.tsv, \.csv"):
        load_summarization(other)
