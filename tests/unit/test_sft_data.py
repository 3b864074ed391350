"""Fine-tuning data: readers, chat template + assistant-only labels, packing, resumable batches."""

import json

import pytest
import torch

from lmforge.config import ConfigError, UserError
from lmforge.data.labelled import encode_labelled, label_list, load_labelled
from lmforge.data.records import DataError, read_records
from lmforge.data.sft import IGNORE_INDEX, SFTExample, encode_example, encode_examples, load_sft_examples
from lmforge.data.sft_batching import SFTBatchIterator, collate_rows, pack_rows
from lmforge.tasks.sft import sft_batch_dict
from lmforge.tokenizer.chat_template import (
    default_chat_template,
    encode_chat,
    encode_prompt,
    get_chat_template,
    render,
    render_generation_prompt,
    save_chat_template,
)
from lmforge.train.trainer import split_micro

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "What is two plus two? Two plus two is four. Answer briefly and be helpful.",
    "今天天气很好，我们去公园散步吧。你好，世界！机器学习很有趣。",
    "Translate to Chinese: I like apples. 我喜欢苹果。 Summarize the text in one sentence.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好，世界！"}]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---- readers ------------------------------------------------------------------------------------
def test_read_all_instruction_formats(tmp_path):
    alpaca = write(tmp_path / "a.json", json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "Hi", "system": "Be nice.",
         "history": [["Who are you?", "A model."]]}], indent=2))
    ex = load_sft_examples(alpaca)
    assert ex[0].messages == [{"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                              {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in ex[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex[0].where.endswith("a.json:2") and ex[1].where.endswith("a.json:7")

    chat = write(tmp_path / "c.jsonl", json.dumps({"messages": CHAT}, ensure_ascii=False) + "\n")
    assert load_sft_examples(chat)[0].messages == CHAT
    share = write(tmp_path / "s.jsonl", json.dumps({"system": "Be brief.", "conversations": [
        {"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]}) + "\n")
    assert load_sft_examples(share, "sharegpt")[0].messages == CHAT[:3]
    pc = write(tmp_path / "p.jsonl", '{"prompt": "2+2=", "completion": "4"}\n')
    e = load_sft_examples(pc)[0]
    assert (e.prompt, e.completion, e.messages) == ("2+2=", "4", None)
    bilingual = write(tmp_path / "b.json", json.dumps([{"zh_instruction": "问", "zh_input": "", "zh_output": "答"}]))
    cols = {"instruction": "zh_instruction", "input": "zh_input", "output": "zh_output"}
    assert load_sft_examples(bilingual, "alpaca", columns=cols)[0].messages[1]["content"] == "答"


@pytest.mark.parametrize("content, fmt, message", [
    ('{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": \n', "auto", r"d\.jsonl:2: invalid JSON"),
    ('{"instruction": "x"}\n', "alpaca", r"d\.jsonl:1: record has no 'output' field"),
    ('{"text": "x"}\n', "auto", r"d\.jsonl:1: cannot tell the data format"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', "chat", r"d\.jsonl:1: message 0 has role 'bot'"),
    ('\n\n{"messages": [{"role": "user", "content": "x"}]}\n', "chat", r"d\.jsonl:3: .*no assistant turn"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}\n', "sharegpt", r"d\.jsonl:1: turn 0 is from 'alien'"),
    ('{"prompt": 1, "completion": "x"}\n', "prompt_completion", r"d\.jsonl:1: prompt must be a string"),
])
def test_reader_errors_name_file_and_line(tmp_path, content, fmt, message):
    path = write(tmp_path / "d.jsonl", content)
    with pytest.raises(DataError, match=message):
        load_sft_examples(path, fmt)


def test_json_array_errors_and_line_numbers(tmp_path):
    path = write(tmp_path / "arr.json", '[\n {"a": 1},\n\n {"b": 2}\n]')
    assert [line for line, _ in read_records(path)] == [2, 4]
    with pytest.raises(DataError, match=r"t\.json:3: invalid JSON"):
        list(read_records(write(tmp_path / "t.json", '[\n {"a": 1},\n {"b": }\n]')))
    with pytest.raises(DataError, match="truncated"):
        list(read_records(write(tmp_path / "u.json", '[\n {"a": 1},\n')))
    with pytest.raises(DataError, match="does not exist"):
        load_sft_examples(tmp_path / "missing.json")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not valid UTF-8"):
        (tmp_path / "bad.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
        load_sft_examples(tmp_path / "bad.jsonl")


def test_labelled_readers(tmp_path):
    tsv = write(tmp_path / "d.tsv", "sentence\tlabel\nit 's \"great\" \t1\nbad\t0\n")
    ex = load_labelled(tsv)
    assert [(e.text, e.label) for e in ex] == [("it 's \"great\" ", "1"), ("bad", "0")]
    csv_ = write(tmp_path / "d.csv", 'label,review\n1,"好,很好"\n0,"差\n很差"\n')
    ex = load_labelled(csv_)
    assert [(e.text, e.label) for e in ex] == [("好,很好", "1"), ("差\n很差", "0")]
    no_header = write(tmp_path / "t.txt", "标题一\t8\n标题二\t10\n标题三\t2\n")
    ex = load_labelled(no_header, text_field=0, label_field=1)
    assert label_list(ex) == ["2", "8", "10"]
    jl = write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    assert label_list(load_labelled(jl)) == ["neg", "pos"]
    with pytest.raises(DataError, match=r"d\.tsv:1: header has no column 'stars'.*columns: sentence, label"):
        load_labelled(tsv, label_field="stars")
    with pytest.raises(DataError, match=r"d\.jsonl:1: record has no 'y' field"):
        load_labelled(jl, label_field="y")
    with pytest.raises(DataError, match=r"t\.txt:2: row has 1 column"):
        load_labelled(write(tmp_path / "t.txt", "a\t1\nb\n"), 0, 1)


def test_labelled_real_data(real_data):
    rt = load_labelled(real_data / "sentiment_en_rt_polarity" / "rt_polarity.tsv")  # TSV with a header
    assert len(rt) == 600 and label_list(rt) == ["0", "1"] and sum(e.label == "1" for e in rt) == 300
    assert (rt[0].text, rt[0].label) == ("simplistic , silly and tedious .", "0")
    poems = load_labelled(real_data / "chinese_poetry" / "derived" / "tang_or_song.csv")  # CSV: label,review
    assert len(poems) == 600 and label_list(poems) == ["song", "tang"]
    assert poems[0].label == "tang" and poems[0].text.startswith("百禮崇容")
    titles = load_labelled(real_data / "chinese_poetry" / "derived" / "titles.txt", 0, 1)  # no header: columns
    assert len(titles) == 300 and label_list(titles) == ["song", "tang"]


# ---- chat template ------------------------------------------------------------------------------
def test_template_renders_in_immutable_sandbox():
    with pytest.raises(ConfigError, match="failed to render"):  # no mutation of the messages
        render("{{ messages.append(1) }}", [])
    with pytest.raises(ConfigError, match="failed to render"):  # no reaching into Python internals
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(ConfigError, match="chat template: no tools"):
        render("{{ raise_exception('no tools') }}", [])
    with pytest.raises(ConfigError, match="does not compile"):
        render("{% for m in messages %}", [])


def test_encode_chat_trains_only_assistant_tokens(tok):
    ids, labels = encode_chat(tok, CHAT)
    assert len(ids) == len(labels)
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is two plus two?<|end|>\n<|assistant|>\n"
        "Four.<|end|><|eos|>\n<|user|>\n你好<|end|>\n<|assistant|>\n你好，世界！<|end|><|eos|>\n")
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == "Four.<|end|><|eos|>你好，世界！<|end|><|eos|>"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    assert labels.count(tok.eos_id) == 2  # EOS closes each assistant turn and is trained
    # the span before the first reply is exactly what generation is prompted with
    prompt = encode_prompt(tok, CHAT[:2])
    assert ids[:len(prompt)] == prompt and set(labels[:len(prompt)]) == {IGNORE_INDEX}
    assert labels[len(prompt)] != IGNORE_INDEX
    assert render_generation_prompt(tok, CHAT[:2]).endswith("<|assistant|>\n")


def test_template_that_writes_eos_and_bos_is_trained_through_eos(tok):
    # A ChatML-style template with BOS, EOS after each reply and text after EOS.
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ids, labels = encode_chat(tok, CHAT[1:3], template)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == "Four.<|eos|>"
    assert ids.count(tok.eos_id) == 1  # not appended twice
    assert tok.decode(ids, skip_special_tokens=False) == (
        "<|bos|>user: What is two plus two?\nassistant: Four.<|eos|>\n")
    assert labels[-1] == IGNORE_INDEX  # the newline after EOS is not trained


def test_non_incremental_template_is_rejected(tok):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    with pytest.raises(ConfigError, match="not incremental"):
        encode_chat(tok, CHAT[1:3], template)


def test_template_sources(tok, tmp_path):
    from lmforge.tokenizer.core import load_tokenizer

    assert get_chat_template(tok) == tok.chat_template  # stored with the tokenizer
    custom = "{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    f = write(tmp_path / "t.jinja", custom)
    assert get_chat_template(tok, str(f)) == custom
    tok.save(tmp_path / "tokdir")
    save_chat_template(custom, tmp_path / "tokdir")
    assert load_tokenizer(tmp_path / "tokdir").chat_template == custom
    with pytest.raises(ConfigError, match="does not exist"):
        get_chat_template(tok, str(tmp_path / "nope.jinja"))

    class Plain:  # no role tokens, no stored template -> plain headers + EOS
        bos_id, eos_id, special_tokens, chat_template = None, 2, {"<eos>": 2}, None

        def encode(self, text):
            return [3 + b for b in text.encode()]

    assert render(default_chat_template(Plain()), CHAT[1:3], eos_token="<eos>") == (
        "User: What is two plus two?\n\nAssistant: Four.<eos>\n\n")


def test_prompt_completion_encoding(tok):
    ids, labels = encode_example(tok, SFTExample(prompt="2+2=", completion=" 4"))
    assert tok.decode(ids, skip_special_tokens=False) == "2+2= 4<|eos|>"
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == " 4<|eos|>"


def test_encode_examples_truncates_and_drops(tok):
    long_reply = SFTExample(messages=[{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "the lazy dog " * 50}])
    long_prompt = SFTExample(messages=[{"role": "user", "content": "the lazy dog " * 50},
                                       {"role": "assistant", "content": "ok"}])
    ds = encode_examples(tok, [long_reply, long_prompt, SFTExample(prompt="a", completion="b")], seq_len=32)
    assert ds.stats["truncated"] == 2 and ds.stats["dropped"] == 1 and len(ds) == 2
    assert max(ds.lengths()) <= 32
    with pytest.raises(DataError, match="every one of the 1 examples was dropped"):
        encode_examples(tok, [long_prompt], seq_len=32)


def test_encode_labelled(tok, tmp_path):
    ex = load_labelled(write(tmp_path / "d.tsv", "text\tlabel\ngood dog\tpos\nbad\tneg\n"))
    ids, ys = encode_labelled(tok, ex, ["neg", "pos"], max_len=3)
    assert ys == [1, 0] and all(1 <= len(x) <= 3 for x in ids)
    with pytest.raises(DataError, match="label 'neg' is not one of"):
        encode_labelled(tok, ex, ["pos", "other"], 8)


# ---- packing ------------------------------------------------------------------------------------
def test_pack_rows_best_fit():
    lengths = [5, 9, 3, 7, 2, 8, 1, 4]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 39 positions need at least 4 rows of 10
    assert rows == pack_rows(lengths, 10)
    with pytest.raises(ValueError):
        pack_rows([11], 10)


def _dataset(tok, n=12, seed=0):
    import random

    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "你好", "世界"]
    examples = [SFTExample(messages=[
        {"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))},
        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))}])
        for _ in range(n)]
    return encode_examples(tok, examples, seq_len=64)


def test_packed_batch_layout(tok):
    ds = _dataset(tok, 5)
    batch = collate_rows(ds, [[0, 1, 2], [3, 4]], seq_len=128, pad_id=tok.pad_id, packed=True)
    assert batch.tokens.shape == (2, 128) and batch.attention_mask.shape == (2, 1, 128, 128)
    n0, n1 = len(ds.input_ids[0]) - 1, len(ds.input_ids[1]) - 1
    assert batch.tokens[0, :n0].tolist() == ds.input_ids[0][:-1]
    assert batch.labels[0, :n0].tolist() == ds.labels[0][1:]  # shifted targets
    assert batch.positions[0, n0:n0 + n1].tolist() == list(range(n1))  # positions restart per example
    assert batch.doc_ids[0, n0] == 1 and batch.doc_ids[0, -1] == -1
    m = batch.attention_mask[0, 0]
    assert not m[n0, n0 - 1] and m[n0 + 1, n0] and m[-1, -1]  # no attention across examples
    assert (batch.labels[batch.doc_ids == -1] == IGNORE_INDEX).all()
    from lmforge.data.loader import document_mask

    torch.testing.assert_close(document_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].long(),
                               torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))


def test_packed_row_gives_same_logits_and_loss_as_examples_alone(tok):
    import torch.nn.functional as F

    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    model = build_model(get_preset("tiny"), seed=0).eval()
    ds = _dataset(tok, 4, seed=1)
    batch = collate_rows(ds, [[0, 1, 2, 3]], seq_len=128, pad_id=tok.pad_id, packed=True)
    with pytest.raises(ValueError, match="pack with pack_rows"):
        collate_rows(ds, [[0, 1, 2, 3]], seq_len=8, pad_id=tok.pad_id, packed=True)
    with torch.no_grad():
        packed = model(batch.tokens, positions=batch.positions, mask=batch.attention_mask)
        t, losses = 0, []
        for i in range(4):
            x = torch.tensor([ds.input_ids[i][:-1]])
            alone = model(x)
            n = x.size(1)
            torch.testing.assert_close(packed[0, t:t + n], alone[0], atol=1e-5, rtol=1e-4)
            losses.append(F.cross_entropy(alone[0], torch.tensor(ds.labels[i][1:]), ignore_index=-100,
                                          reduction="sum"))
            t += n
        packed_loss = F.cross_entropy(packed[0], batch.labels[0], ignore_index=-100, reduction="sum")
    torch.testing.assert_close(packed_loss, sum(losses), atol=1e-4, rtol=1e-5)


# ---- iterator -----------------------------------------------------------------------------------
def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("mode", ["pack", "group", "shuffle"])
def test_iterator_is_deterministic_and_resumes_exactly(tok, mode):
    ds = _dataset(tok, 40)
    seq = 64
    make = lambda **kw: SFTBatchIterator(ds, 4, seq, mode=mode, seed=3, pad_id=tok.pad_id, **kw)
    ref = _take(make(), 12)  # crosses epoch boundaries
    again = _take(make(), 12)
    for a, b in zip(ref, again):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    it = make()
    _take(it, 5)
    state = it.state_dict()
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(_take(resumed, 7), ref[5:]):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
    other = _take(SFTBatchIterator(ds, 4, seq, mode=mode, seed=4, pad_id=tok.pad_id), 3)
    assert [b.tokens.tolist() for b in other] != [b.tokens.tolist() for b in ref[:3]]


def test_each_epoch_visits_every_unit_once(tok):
    ds = _dataset(tok, 24)
    it = SFTBatchIterator(ds, 4, 64, mode="shuffle", seed=0, pad_id=tok.pad_id)
    assert it.batches_per_epoch == 6
    seen = []
    for b in _take(it, 6):
        for row in b.tokens:
            seen.append(tuple(t for t in row.tolist() if t != tok.pad_id))
    assert sorted(seen) == sorted(tuple(x[:-1]) for x in ds.input_ids)


@pytest.mark.parametrize("mode", ["pack", "group"])
def test_rank_slices_reassemble_the_global_batch_and_resume_on_other_world_size(tok, mode):
    ds = _dataset(tok, 48)
    one = SFTBatchIterator(ds, 4, 64, mode=mode, seed=1, pad_id=tok.pad_id)
    ref = _take(one, 6)
    ranks = [SFTBatchIterator(ds, 4, 64, mode=mode, seed=1, pad_id=tok.pad_id, rank=r, world_size=2)
             for r in range(2)]
    for step in range(3):
        parts = [next(r) for r in ranks]
        assert all(p.tokens.size(0) == 2 for p in parts)
        got = [row[row != tok.pad_id].tolist() for p in parts for row in p.tokens]
        want = [row[row != tok.pad_id].tolist() for row in ref[step].tokens]
        assert got == want
    state = ranks[0].state_dict()
    solo = SFTBatchIterator(ds, 4, 64, mode=mode, seed=1, pad_id=tok.pad_id)
    solo.load_state_dict(state)  # 2 ranks -> 1 rank: the same global stream continues
    assert torch.equal(next(solo).labels, ref[3].labels)


def test_length_grouping_cuts_padding(tok):
    ds = _dataset(tok, 64)
    pad = {}
    for mode in ("group", "shuffle"):
        it = SFTBatchIterator(ds, 4, 64, mode=mode, seed=0, pad_id=tok.pad_id, group_size=16, pad_to_multiple=1)
        batches = _take(it, it.batches_per_epoch)
        pad[mode] = sum(int((b.doc_ids == -1).sum()) for b in batches)
        assert all(b.attention_mask is None for b in batches)
    assert pad["group"] < pad["shuffle"] / 2


def test_iterator_errors(tok):
    ds = _dataset(tok, 6)
    with pytest.raises(UserError, match="not divisible by 4 ranks; try 8"):
        SFTBatchIterator(ds, 6, 64, world_size=4)
    with pytest.raises(UserError, match="fewer than one global batch"):
        SFTBatchIterator(ds, 8, 64, mode="shuffle")
    with pytest.raises(UserError, match="longer than seq_len=4"):
        SFTBatchIterator(ds, 2, 4)
    it = SFTBatchIterator(ds, 2, 64, mode="shuffle", seed=0)
    with pytest.raises(UserError, match="checkpoint has seed=1"):
        it.load_state_dict({**it.state_dict(), "seed": 1})
    b = next(it)
    micro = split_micro(sft_batch_dict(b), 1)  # the Trainer's own split of the dict batch
    assert [m["tokens"].size(0) for m in micro] == [1, 1]
    for key in ("tokens", "labels", "positions"):
        assert torch.equal(torch.cat([m[key] for m in micro]), getattr(b, key))


def test_real_alpaca_data_packs(tok, real_data):
    ex = load_sft_examples(real_data / "translation_en_zh_tatoeba" / "derived" / "alpaca_translate.json",
                           max_examples=160)
    ds = encode_examples(tok, ex, seq_len=256)
    it = SFTBatchIterator(ds, 4, 256, mode="pack", seed=0, pad_id=tok.pad_id)
    b = next(it)
    assert b.tokens.shape == (4, 256) and b.n_target_tokens > 0
    fill = sum(ds.lengths()) / (len(it.units) * 256)
    assert fill > 0.8, f"packing fill {fill:.2f}"


def test_qwen_style_chatml_template_with_im_end_as_eos(tmp_path):
    """A Hugging Face ChatML template (Qwen2) whose EOS is <|im_end|>: replies train through <|im_end|>,
    which is not appended a second time."""
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "c.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    qtok = train_tokenizer([str(tmp_path / "c.txt")], 400, None, progress=False,
                           special_tokens=("<|endoftext|>", "<|bos|>", "<|im_end|>", "<|im_start|>"),
                           chat_template=("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' "
                                          "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                                          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    ids, labels = encode_chat(qtok, CHAT[1:])
    assert qtok.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好，世界！<|im_end|>\n")
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert qtok.decode(trained, skip_special_tokens=False) == "Four.<|im_end|>你好，世界！<|im_end|>"
