"""`lmforge eval --task choice` data: the four layouts, their prompts (the harness's templates) and bad input."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.records import DataError
from lmforge.eval.choice import encode_pair, load_choice
from tests.conftest import TEST_DATA

CHOICE = TEST_DATA / "choice"


def test_layouts_and_prompts_follow_the_harness_templates():
    mmlu = load_choice(str(CHOICE / "mmlu.jsonl"))
    assert mmlu[0].layout == "mmlu" and mmlu[0].gold == 1 and mmlu[0].choices == ["A", "B", "C", "D"]
    assert mmlu[0].query == ("What is the boiling point of water at sea level in degrees Celsius?\n"
                             "A. 50\nB. 100\nC. 150\nD. 212\nAnswer:")
    assert mmlu[0].subject == "physics"
    ceval = load_choice(str(CHOICE / "ceval.csv"))
    assert [e.layout for e in ceval] == ["ceval"] * 6 and ceval[0].gold == 1 and ceval[0].query.endswith("\n答案：")
    cmmlu = load_choice(str(CHOICE / "cmmlu.csv"))
    assert cmmlu[0].layout == "cmmlu" and cmmlu[0].gold == 0 and cmmlu[0].query.startswith("长江流入哪个海？\nA. 东海")
    hs = load_choice(str(CHOICE / "hellaswag.jsonl"))
    assert hs[0].query == "Making tea: A woman fills a kettle with water and puts it on the stove. She"
    assert hs[2].query == "Home and Garden: How to water a plant. Check the soil."  # WikiHow brackets cleaned
    # the harness's preprocess leaves the space before a removed "[step]": kept, to score the same text
    assert hs[2].choices[0] == " Feel the top inch of soil with your finger." and hs[5].gold == 2
    assert load_choice(str(CHOICE / "ceval.csv"), layout="mmlu")[0].query.endswith("\nAnswer:")


def test_headerless_mmlu_csv_and_letter_or_index_answers(tmp_path):
    (tmp_path / "m.csv").write_text('What is 1+1?,1,2,3,4,B\n"Pick, the first",a,b,c,d,A\n', encoding="utf-8")
    ex = load_choice(str(tmp_path / "m.csv"))
    assert [e.gold for e in ex] == [1, 0] and ex[1].query.startswith("Pick, the first\nA. a")
    (tmp_path / "i.jsonl").write_text('{"question": "q", "choices": ["x", "y", "z"], "answer": "2"}\n')
    assert load_choice(str(tmp_path / "i.jsonl"))[0].gold == 2


@pytest.mark.parametrize("line,match", [
    ('{"question": "q", "A": "a", "B": "b", "answer": "C"}', "answer='C' is not one of the 2 choices"),
    ('{"question": "q", "A": "a", "answer": "A"}', "needs choices A, B"),
    ('{"text": "no question here"}', "no 'question'"),
    ('{"ctx": "c", "endings": ["x", ""], "label": 0}', "a choice is empty"),
    ('{"ctx": "c", "endings": "x", "label": 0}', "'endings' must be a list"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_bad_records_name_the_file_line_and_fix(tmp_path, line, match):
    (tmp_path / "bad.jsonl").write_text('{"question": "ok", "A": "a", "B": "b", "answer": "A"}\n' + line + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_choice(str(tmp_path / "bad.jsonl"))
    assert "bad.jsonl:2" in str(e.value)


def test_encode_pair_splits_like_the_harness():
    class Chars:  # one token per character: the split is visible
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    tok = Chars()
    ctx, cont = encode_pair(tok, "Answer: ", "B", add_bos=False)  # the trailing space moves to the continuation
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(" "), ord("B")]
    assert encode_pair(tok, "Q", " A", add_bos=True) == ([1, ord("Q")], [ord(" "), ord("A")])
    assert encode_pair(tok, "", "hi", add_bos=False) == ([1], [ord("h"), ord("i")])  # empty context -> BOS


def _reference_scores(model, pairs, max_length):
    """The pre-device-gather computation: one row at a time, full fp32 log-softmax on the host."""
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for ctx, cont in pairs:
            whole = (list(ctx) + list(cont))[-(max_length + 1):]
            inp, cont = whole[:-1], list(cont)[-(len(whole) - 1):]
            logp = F.log_softmax(model(torch.tensor([inp])).float(), dim=-1)[0].cpu()
            lp = logp[len(inp) - len(cont):len(inp)]
            target = torch.tensor(cont)
            out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
    return out


def test_score_continuations_gathers_on_the_device_and_matches_the_full_log_softmax(monkeypatch):
    """Batched, right-padded, over-long rows cut: the same sums and greedy flags as the full (B, T, V)
    log-softmax per row, without the model's full logits (only the continuation positions reach the head)."""
    from lmforge.eval.choice import score_continuations
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    model = build_model(cfg, seed=3).eval()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()

    pairs = [(ids(5), ids(2)), (ids(1), ids(1)), (ids(12), ids(4)), (ids(20), ids(3)), (ids(3), ids(6))]
    want = _reference_scores(model, pairs, max_length=16)
    # a continuation the model picks greedily: the reference's own argmax
    with torch.no_grad():
        ctx = ids(4)
        first = int(model(torch.tensor([ctx]))[0, -1].argmax())
    pairs.append((ctx, [first]))
    want.append(_reference_scores(model, pairs[-1:], 16)[0])
    assert want[-1][1] is True
    rows_seen = []
    real_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda h: rows_seen.append(h.shape) or real_logits(h))
    got = score_continuations(model, pairs, batch_size=3, max_length=16)
    assert [g_[1] for g_ in got] == [w[1] for w in want]
    for (a, _), (b, _) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-4)
    # two batches; the head saw only the continuation positions (N, dim), never (B, T, dim)
    assert [len(s) for s in rows_seen] == [2, 2]
    assert sum(s[0] for s in rows_seen) == sum(len(c) for _, c in pairs)
