"""`lmforge eval --task choice` data: the four layouts, their prompts (the harness's templates) and bad input."""

from __future__ import annotations

import pytest

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
