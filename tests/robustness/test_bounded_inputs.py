"""Bounded data inputs (issue 22, "Data files" and "Fine-tuning data"): JSON depth and record-size caps in
every data reader, the whole --quality-config checked up front, empty / directory decontamination sets,
symlink loops, identical preference pairs, and SFT conversations cut before rendering what is thrown away.
The CLI-level forms of the data cases are in test_cli_corpus.py's CASES."""

from __future__ import annotations

import json
import time

import pytest

from lmforge.config import UserError
from lmforge.data.records import DataError, read_records

DEEP = "[" * 100_000 + "]" * 100_000
LINES = [f"the quick brown fox {i} jumps over the lazy dog number {i % 7}, again and again." for i in range(200)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    from lmforge.tokenizer.core import load_tokenizer

    root = tmp_path_factory.mktemp("tok")
    make_tokenizer(root, LINES, vocab_size=300, name="tok")
    return load_tokenizer(root / "tok")


# ---- the shared parser ------------------------------------------------------------------------------

def test_loads_bounded_refuses_deep_and_oversized_json_naming_where():
    from lmforge.config import MAX_JSON_DEPTH, loads_bounded

    with pytest.raises(UserError, match=r"^f\.jsonl:7: JSON nested deeper than 64 levels"):
        loads_bounded(DEEP, "f.jsonl:7")
    # deeper than the cap but shallow enough for json itself: still refused (the walk, not RecursionError)
    with pytest.raises(UserError, match="nested deeper"):
        loads_bounded("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "x")
    assert loads_bounded("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, "x") is not None
    with pytest.raises(UserError, match="over the 10 limit"):
        loads_bounded('"' + "a" * 20 + '"', "x", max_chars=10)
    with pytest.raises(DataError):
        loads_bounded(DEEP, "x", DataError)
    # brackets inside strings are counted cheaply but the walk clears them
    assert loads_bounded(json.dumps({"text": "[" * 500}), "x") == {"text": "[" * 500}
    assert loads_bounded('  [1, {"a": 2}] , 3', "x", pos=2) == ([1, {"a": 2}], 15)
    with pytest.raises(json.JSONDecodeError):
        loads_bounded("{bad", "x")


# ---- every data reader ------------------------------------------------------------------------------

def test_fine_tuning_records_deep_jsonl_line_and_json_element_name_file_and_line(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"instruction": "a", "output": "b"}\n{"x": ' + DEEP + "}\n")
    with pytest.raises(DataError, match=r"d\.jsonl:2: JSON nested deeper"):
        list(read_records(jl))
    arr = tmp_path / "d.json"
    arr.write_text('[{"instruction": "a", "output": "b"},\n\n' + DEEP + "]")
    with pytest.raises(DataError, match=r"d\.json:3: JSON nested deeper"):
        list(read_records(arr))
    arr.write_text('[{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": "d"}]')
    assert [line for line, _ in read_records(arr)] == [1, 2]  # line numbers still right


@pytest.mark.parametrize("name, content, where", [
    ("d.jsonl", '{"text": "fine"}\n{"text": ' + DEEP + "}\n", "d.jsonl:2"),
    ("d.json", DEEP, "d.json"),
])
def test_prepare_readers_refuse_deep_json(tmp_path, name, content, where):
    from lmforge.sources import iter_file_documents

    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=where.replace(".", r"\.") + ": JSON nested deeper"):
        list(iter_file_documents(str(tmp_path / name)))


@pytest.mark.parametrize("name, content", [("set.jsonl", '{"q": ' + DEEP + "}\n"), ("set.json", DEEP)])
def test_decontamination_sets_refuse_deep_json(tmp_path, name, content):
    from lmforge.data.decontaminate import read_items

    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match="--decontaminate .*JSON nested deeper"):
        read_items(str(tmp_path / name))


def test_eval_readers_refuse_deep_json(tmp_path):
    from lmforge.eval.datasets import load_qa
    from lmforge.eval.safety import load_safety_set

    (tmp_path / "qa.json").write_text(DEEP)
    with pytest.raises(DataError, match="JSON nested deeper"):
        load_qa(tmp_path / "qa.json")
    (tmp_path / "s.jsonl").write_text('{"prompt": ' + DEEP + "}\n")
    with pytest.raises(UserError, match=r"s\.jsonl:1: JSON nested deeper"):
        load_safety_set(tmp_path / "s.jsonl")


def test_remote_index_refuses_deep_json():
    from lmforge.data.remote import parse_index_bytes

    with pytest.raises(UserError, match="nested deeper"):
        parse_index_bytes(DEEP.encode(), "s3://b/index.json")


# ---- --quality-config -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, phrase", [
    ({"gopher_repetition": {"dup_ngram_char_frac": {"5": "x"}}}, "gopher_repetition.dup_ngram_char_frac.5='x'"),
    ({"gopher_repetition": {"top_ngram_char_frac": {"0": 0.1}}}, "n (an integer >= 1)"),
    ({"gopher_repetition": {"dup_ngram_char_frac": "x"}}, "gopher_repetition.dup_ngram_char_frac maps n"),
    ({"gopher_quality": {"min_doc_words": float("nan")}}, "gopher_quality.min_doc_words=nan must be a number"),
    ({"fineweb": {"line_punct_thr": True}}, "fineweb.line_punct_thr=True must be a number"),
])
def test_quality_config_wrong_types_are_refused_up_front(overrides, phrase):
    from lmforge.data.quality import resolve_thresholds

    with pytest.raises(UserError, match="^--quality-config") as e:
        resolve_thresholds(overrides)
    assert phrase in str(e.value) and "\n" not in str(e.value)
    ok = resolve_thresholds({"gopher_repetition": {"dup_ngram_char_frac": {"5": 0.2, 6: None}}})
    assert ok["gopher_repetition"]["dup_ngram_char_frac"] == {"5": 0.2, "6": None}


def test_quality_config_inline_non_object_file_and_directory(tmp_path):
    from lmforge.data.doc_filters import make_spec

    with pytest.raises(UserError, match="must be a JSON object"):
        make_spec(quality_filters="gopher", quality_config="[1,2]")
    with pytest.raises(UserError, match="is a directory"):
        make_spec(quality_filters="gopher", quality_config=str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        make_spec(quality_filters="gopher", quality_config=str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="nested"):
        make_spec(quality_filters="gopher", quality_config='{"c4": ' + DEEP + "}")
    f = tmp_path / "q.json"
    f.write_text('{"c4": {"min_sentences": 2}}')
    spec = make_spec(quality_filters="c4", quality_config=str(f))
    assert json.loads(spec.thresholds)["c4"]["min_sentences"] == 2


# ---- --decontaminate sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.txt", "\n\n  \n")])
def test_an_empty_decontamination_set_is_an_error(tmp_path, name, content):
    from lmforge.data.doc_filters import make_spec

    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match="holds no items"):
        make_spec(decontaminate=[str(tmp_path / name)])


def test_a_decontamination_directory_is_named_as_one(tmp_path):
    from lmforge.data.doc_filters import make_spec

    with pytest.raises(UserError, match="is a directory; pass the evaluation set files inside it"):
        make_spec(decontaminate=[str(tmp_path)])
    (tmp_path / "set.txt").write_text("one item with enough words to index it here\n")
    assert make_spec(decontaminate=[str(tmp_path / "set.txt")]).decontaminate == (str(tmp_path / "set.txt"),)


# ---- symlink loops ----------------------------------------------------------------------------------

def test_symlink_loops_are_one_line_errors(tmp_path):
    from lmforge.data.prepare import prepare
    from lmforge.sources import refuse_symlink_loop, resolve_inputs

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for p in (tmp_path / "a", tmp_path / "a" / "sub"):
        with pytest.raises(UserError, match="--out .* goes through a symbolic link loop"):
            refuse_symlink_loop(p, "--out")
    with pytest.raises(UserError, match="--input .* symbolic link loop"):
        resolve_inputs([str(tmp_path / "a")])
    with pytest.raises(UserError, match="--out .* symbolic link loop"):  # the library call, before any work
        prepare([str(tmp_path / "x.txt")], tmp_path / "tok", tmp_path / "a", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    refuse_symlink_loop(tmp_path / "missing", "--out")  # a new path is fine
    refuse_symlink_loop("s3://bucket/x", "--input")


# ---- preference pairs -------------------------------------------------------------------------------

def _pair(chosen, rejected, content="what is two plus two?"):
    from lmforge.data.preference_pairs import PreferencePair

    return PreferencePair([{"role": "user", "content": content}], chosen, rejected, "p.jsonl:1")


def test_identical_or_empty_preference_pairs_are_dropped_counted_and_warned(tok):
    from lmforge.data.preference_pairs import encode_pairs, identical_warning
    from lmforge.tokenizer.chat_template import get_chat_template

    template = get_chat_template(tok)
    pairs = [_pair("Four.", "Five."), _pair("Four.", "Four."), _pair("", ""), _pair("Four.", "Five.")]
    data = encode_pairs(tok, pairs, 64, template)
    assert len(data) == 2 and data.stats["identical"] == 2 and data.stats["dropped"] == 0
    assert all(c != r for c, r in zip(data.chosen, data.rejected))
    warning = identical_warning(data.stats, "data.train")
    assert warning.startswith("warning: data.train: dropped 2 of 4") and "\n" not in warning
    assert identical_warning({"pairs": 3, "identical": 0}, "data.train") is None
    # replies that differ only past data.seq_len are identical in what trains
    long_a, long_b = "the quick brown fox " * 40 + "one", "the quick brown fox " * 40 + "two"
    assert encode_pairs(tok, [_pair(long_a, long_b), *pairs[:1]], 24, template).stats["identical"] == 1
    from lmforge.data.records import DataError as DE

    with pytest.raises(DE, match="chosen and rejected are the same"):
        encode_pairs(tok, [_pair("x", "x")], 64, template)


# ---- SFT: cut before rendering ----------------------------------------------------------------------

def _turns(n):
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} about the fox"},
                {"role": "assistant", "content": f"answer {i} the dog"}]
    return out


@pytest.mark.parametrize("messages", [
    _turns(60),
    # a long run of untrained turns before the first reply: cut inside the untrained stretch
    [{"role": "user", "content": f"user line {i} of a very long prompt"} for i in range(300)]
    + [{"role": "assistant", "content": "finally an answer"}, *_turns(3)],
    _turns(2),  # shorter than the window: nothing is cut
])
def test_sft_cut_keeps_exactly_the_tokens_of_the_whole_conversation(tok, messages):
    from lmforge.data.sft import SFTExample, encode_examples
    from lmforge.tokenizer.chat_template import IGNORE_INDEX, encode_chat

    seq_len = 128
    full_ids, full_labels = encode_chat(tok, messages)
    cut_ids, cut_labels = encode_chat(tok, messages, max_len=seq_len + 1)
    assert (len(cut_ids) > seq_len + 1) == (len(full_ids) > seq_len + 1)
    assert cut_ids[:seq_len + 1] == full_ids[:seq_len + 1] and cut_labels[:seq_len + 1] == full_labels[:seq_len + 1]
    example = SFTExample(messages=messages, where="x:1")
    if all(t == IGNORE_INDEX for t in full_labels[1:seq_len + 1]):  # no reply inside the window: dropped
        with pytest.raises(DataError, match="every one of the 1 examples was dropped"):
            encode_examples(tok, [example], seq_len)
        return
    ds = encode_examples(tok, [example], seq_len)
    assert ds.input_ids[0] == full_ids[:seq_len + 1] and ds.stats["truncated"] == int(len(full_ids) > seq_len + 1)


def test_sft_10000_turn_record_is_linear_in_what_is_kept(tok):
    """Before the cut, 10,000 turns took 630 s here (every turn re-rendered the whole prefix); now 0.05 s: the
    time does not grow with the turns past data.seq_len."""
    from lmforge.data.sft import SFTExample, encode_examples

    def seconds(n):
        t = time.perf_counter()
        ds = encode_examples(tok, [SFTExample(messages=_turns(n), where="x:1")], 256)
        assert ds.stats["truncated"] == 1 and len(ds.input_ids[0]) == 257
        return time.perf_counter() - t

    seconds(100)  # warm the template cache
    small, big = seconds(100), seconds(10_000)
    assert big < 5.0 and big < max(small, 0.01) * 50, (small, big)


@pytest.mark.parametrize("argv", [["export", "--model", "{m}", "--out", "{loop}/x"],
                                  ["import", "--hf", "{loop}/y", "--out", "{d}/z"],
                                  ["import", "--hf", "{d}/hf", "--out", "{loop}/z"]])
def test_symlink_loops_through_the_output_guard_are_one_line_errors(tmp_path, capsys, argv):
    """Every command whose outputs go through `lmforge.outputs` (export, import, eval, tokenizer) refuses a
    path through a symbolic link loop in one line instead of a RuntimeError traceback."""
    from lmforge.cli import main

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    (tmp_path / "m").mkdir()
    (tmp_path / "hf").mkdir()
    args = [a.format(m=tmp_path / "m", loop=tmp_path / "a", d=tmp_path) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link loop" in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "hf", "m"]
