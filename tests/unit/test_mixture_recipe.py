"""lmforge.data.mixture_recipe: `prepare --mixture` adding / updating a source of a pretraining recipe."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError
from lmforge.data.mixture_recipe import add_source, preflight, with_source
from lmforge.data.shards import read_index
from lmforge.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
TEXT = REPO / "tests/data/tinyshakespeare/input.txt"
WIKI = REPO / "tests/data/web/wiki_en.jsonl"


def validate(doc):
    load_config(None, base=doc)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("recipe")
    train_tokenizer([str(TEXT)], 300, d / "tok", txt_mode="blank", progress=False)
    train_tokenizer([str(WIKI)], 280, d / "tok2", progress=False)
    prepare([str(TEXT)], d / "tok", d / "plays", txt_mode="blank", progress=False)
    prepare([str(WIKI)], d / "tok", d / "wiki", progress=False)
    prepare([str(WIKI)], d / "tok2", d / "other", progress=False)
    return d


def tok_hash(d):
    return read_index(d).get("tokenizer_hash")


def add(recipe, shards, name, weight=100.0, on_exhaust=None, **kw):
    return add_source(recipe, name=name, dir=str(shards / name), weight=weight, on_exhaust=on_exhaust,
                      tokenizer_hash=tok_hash(shards / name), validate=validate, **kw)


def test_creates_a_minimal_valid_recipe(shards, tmp_path):
    recipe = tmp_path / "mix.yaml"
    m = add(recipe, shards, "plays", weight=float(read_index(shards / "plays")["splits"]["train"]["tokens"]))
    assert m["created"] and not m["updated"] and m["sources"] == ["plays"]
    text = recipe.read_text()
    assert text.startswith("# Data mixture written by `lmforge prepare --mixture`")
    assert f"lmforge pretrain --config {recipe}" in text and "model.preset: tiny" in text
    cfg = load_config(str(recipe))
    assert cfg.model["preset"] == "tiny" and cfg.data.seq_len > 0 and not cfg.data.dir
    [s] = cfg.data.sources
    assert (s.name, s.dir, s.on_exhaust) == ("plays", str(shards / "plays"), "repeat")
    assert s.weight == read_index(shards / "plays")["splits"]["train"]["tokens"] > 0
    assert "weight: " + str(int(s.weight)) + "\n" in text  # a token count is written as an integer
    assert not (tmp_path / ".mix.yaml.lock").exists()


def test_updates_by_name_and_keeps_the_users_keys_and_comments(shards, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# my run\n# second line\n" + yaml.safe_dump({
        "run": {"dir": str(tmp_path / "r")}, "model": {"preset": "small"},
        "data": {"seq_len": 64, "sources": [{"name": "wiki", "dir": "old/place", "weight": 2.0, "on_exhaust": "stop"}],
                 "schedule": [{"until_step": 5, "weights": {"wiki": 1.0}}]},
        "train": {"global_batch": 8, "micro_batch": 8, "max_tokens": 100000},
        "optim": {"lr": 0.001}}, sort_keys=False))
    m = add(recipe, shards, "wiki", weight=7.0)
    assert m["updated"] and not m["created"]
    m = add(recipe, shards, "plays", weight=3.0, on_exhaust="stop")
    assert m["sources"] == ["wiki", "plays"]
    text = recipe.read_text()
    assert text.startswith("# my run\n# second line\n") and "Data mixture written" not in text
    cfg = load_config(str(recipe))
    assert cfg.model == {"preset": "small"} and cfg.optim.lr == 0.001 and cfg.train.max_tokens == 100000
    assert cfg.run.dir == str(tmp_path / "r") and cfg.data.seq_len == 64
    assert cfg.data.schedule[0].weights == {"wiki": 1.0}
    wiki, plays = cfg.data.sources
    assert (wiki.dir, wiki.weight, wiki.on_exhaust) == (str(shards / "wiki"), 7.0, "stop")  # kept: not passed
    assert (plays.weight, plays.on_exhaust) == (3.0, "stop")


@pytest.mark.parametrize("text, says", [
    ("- a\n- b\n", "must hold a mapping of sections, got list"),
    ("model: [unclosed\n", "is not valid YAML"),
    ("data: 3\n", "data must be a mapping"),
    ("data: {sources: {name: x}}\n", "data.sources must be a list"),
    ("data: {dir: shards/x, seq_len: 64}\n", "sets data.dir (shards/x)"),
    ("data: {seq_len: 64}\n", "is not a valid pretraining recipe: set exactly one of train.global_batch"),
])
def test_a_bad_recipe_file_is_one_line_and_left_as_it_is(shards, tmp_path, text, says):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    for call in (lambda: add(recipe, shards, "plays"),
                 lambda: preflight(recipe, name="plays", dir=str(shards / "plays"), on_exhaust=None,
                                   tokenizer_hash=tok_hash(shards / "plays"), validate=validate)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"--mixture '{recipe}':") and says in msg, msg
    assert recipe.read_text() == text
    assert not (tmp_path / ".bad.yaml.lock").exists()


def test_a_bad_source_name_is_refused_before_anything_is_written(tmp_path):
    recipe = tmp_path / "mix.yaml"
    with pytest.raises(ConfigError, match=r"data.sources\[0\].name='my shards' must be a word"):
        preflight(recipe, name="my shards", dir="x", on_exhaust=None, tokenizer_hash="h", validate=validate)
    assert not recipe.exists()


def test_a_different_tokenizer_is_refused_naming_both(shards, tmp_path):
    recipe = tmp_path / "mix.yaml"
    add(recipe, shards, "plays")
    before = recipe.read_text()
    with pytest.raises(ConfigError) as e:
        add(recipe, shards, "other")
    msg = str(e.value)
    assert "\n" not in msg and f"'plays' ({shards / 'plays'})" in msg and f"'other' ({shards / 'other'})" in msg
    assert tok_hash(shards / "plays") in msg and tok_hash(shards / "other") in msg
    assert recipe.read_text() == before
    add(recipe, shards, "wiki")  # the same tokenizer is added
    assert [s.name for s in load_config(str(recipe)).data.sources] == ["plays", "wiki"]


def test_a_source_not_prepared_yet_is_noted_not_refused(shards, tmp_path, capsys):
    recipe = tmp_path / "mix.yaml"
    doc, _ = with_source({}, recipe, name="later", dir=str(tmp_path / "missing"), weight=1.0, on_exhaust=None)
    recipe.write_text(yaml.safe_dump(doc))
    add(recipe, shards, "plays")
    assert "source 'later' not checked" in capsys.readouterr().err
    assert [s.name for s in load_config(str(recipe)).data.sources] == ["later", "plays"]


_WRITER = """
import sys
from lmforge.data.mixture_recipe import add_source
from lmforge.train.config import load_config
recipe, name, d, h = sys.argv[1:]
add_source(recipe, name=name, dir=d, weight=1.0, on_exhaust=None, tokenizer_hash=h,
           validate=lambda doc: load_config(None, base=doc))
"""


def test_concurrent_writers_all_land(shards, tmp_path):
    recipe = tmp_path / "mix.yaml"
    h = tok_hash(shards / "plays")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(recipe), f"s{i}", str(shards / "plays"), h],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(6)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(s.name for s in load_config(str(recipe)).data.sources) == [f"s{i}" for i in range(6)]
    assert not (tmp_path / ".mix.yaml.lock").exists()
