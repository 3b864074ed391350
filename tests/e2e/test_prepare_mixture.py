"""`lmforge prepare --mixture RECIPE.yaml` through the real CLI: three prepares build one recipe, `lmforge plan`
prints its tokens per source, a short `lmforge pretrain` runs on it; concurrent prepares both land; a bad
recipe file and a different tokenizer are refused in one line before anything is prepared."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # prepares + a short pretrain through the CLI (~30 s on a shared 2-core CPU)

REPO = Path(__file__).resolve().parents[2]
TEXTS = {"plays": (REPO / "tests/data/tinyshakespeare/input.txt", ["--txt-mode", "blank"]),
         "speeches": (REPO / "tests/data/english_corpus/nltk_inaugural", []),
         "wiki": (REPO / "tests/data/web/wiki_en.jsonl", [])}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def cli(*args):
    return [sys.executable, "-m", "lmforge", *map(str, args)]


def lmforge(*args, check=True, cwd=REPO):
    p = subprocess.run(cli(*args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    lmforge("tokenizer", "train", "--input", TEXTS["plays"][0], "--txt-mode", "blank", "--vocab-size", 400,
            "--out", d / "tok")
    lmforge("tokenizer", "train", "--input", TEXTS["wiki"][0], "--vocab-size", 300, "--out", d / "tok2")
    return d


def prepare(tok, out, name, recipe, *extra, check=True):
    src, opts = TEXTS[name]
    return lmforge("prepare", "--input", src, *opts, "--tokenizer", tok, "--out", out, "--val-fraction", 0.05,
                   "--no-progress", "--mixture", recipe, *extra, check=check)


def test_three_prepares_build_a_recipe_that_plans_and_trains(toks, tmp_path):
    recipe = tmp_path / "mix.yaml"
    lines = {}
    for name in TEXTS:
        extra = ["--weight", 0.25, "--on-exhaust", "stop"] if name == "wiki" else []
        p = prepare(toks / "tok", tmp_path / "shards" / name, name, recipe, *extra)
        lines[name] = p.stdout.strip().splitlines()[-1]
    assert lines["plays"].startswith("added source 'plays' (weight ") and f"in {recipe} (1 source(s): plays)" in \
        lines["plays"]
    assert f"`lmforge plan --model {recipe}`" in lines["wiki"] and f"`lmforge pretrain --config {recipe}`" in \
        lines["wiki"] and "(3 source(s): plays, speeches, wiki)" in lines["wiki"]
    doc = yaml.safe_load(recipe.read_text())
    by_name = {s["name"]: s for s in doc["data"]["sources"]}
    for name in ("plays", "speeches"):  # the default weight is the train tokens prepared
        index = json.loads((tmp_path / "shards" / name / "index.json").read_text())
        assert by_name[name]["weight"] == index["splits"]["train"]["tokens"] > 0
        assert by_name[name]["on_exhaust"] == "repeat"
    assert (by_name["wiki"]["weight"], by_name["wiki"]["on_exhaust"]) == (0.25, "stop")

    # the same prepare again (--overwrite) updates its source in place, with --json
    p = prepare(toks / "tok", tmp_path / "shards" / "speeches", "speeches", recipe, "--overwrite", "--json",
                "--weight", 5)
    m = json.loads(p.stdout)["mixture"]
    assert m["updated"] and m["sources"] == ["plays", "speeches", "wiki"] and m["weight"] == 5

    plan = lmforge("plan", "--model", recipe).stdout
    assert "data.sources over" in plan
    for name in TEXTS:
        assert f"  {name}: " in plan and "tokens (" in plan.split(f"  {name}: ")[1].splitlines()[0]
    mix = json.loads(lmforge("plan", "--model", recipe, "--json").stdout)["data_sources"]
    assert set(mix["sources"]) == set(TEXTS)

    run = tmp_path / "run"
    p = lmforge("pretrain", "--config", recipe, f"run.dir={run}", "train.max_steps=3", "data.seq_len=64",
                "train.global_batch=8", "train.micro_batch=8", "eval.batches=1", "train.threads=1", "--json")
    result = json.loads(p.stdout)
    assert result["step"] == 3 and result["stop_reason"] == "max_steps"
    assert (run / "model" / "model.safetensors").is_file()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in evals if r.get("kind") == "eval"][-1]
    assert all(f"val_loss/{n}" in last for n in TEXTS)


def test_concurrent_prepares_into_one_recipe_both_land(toks, tmp_path):
    recipe = tmp_path / "mix.yaml"
    procs = []
    for name in ("plays", "wiki"):
        src, opts = TEXTS[name]
        procs.append(subprocess.Popen(cli("prepare", "--input", src, *opts, "--tokenizer", toks / "tok", "--out",
                                          tmp_path / name, "--no-progress", "--mixture", recipe),
                                      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    doc = yaml.safe_load(recipe.read_text())
    assert sorted(s["name"] for s in doc["data"]["sources"]) == ["plays", "wiki"]
    assert not (tmp_path / ".mix.yaml.lock").exists()


def test_a_bad_recipe_file_is_refused_before_preparing(toks, tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- not\n- a mapping\n")
    p = prepare(toks / "tok", tmp_path / "plays", "plays", recipe, check=False)
    assert p.returncode == 2 and p.stdout == ""
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"error: --mixture '{recipe}':") and "must hold a mapping" in line
    assert not (tmp_path / "plays").exists() and recipe.read_text() == "- not\n- a mapping\n"
    p = lmforge("prepare", "--input", TEXTS["wiki"][0], "--tokenizer", toks / "tok", "--out", tmp_path / "w",
                "--weight", 2, check=False)
    assert p.returncode == 2 and "--weight needs --mixture" in p.stderr and not (tmp_path / "w").exists()


def test_a_different_tokenizer_is_refused_naming_both(toks, tmp_path):
    recipe = tmp_path / "mix.yaml"
    prepare(toks / "tok", tmp_path / "plays", "plays", recipe)
    before = recipe.read_text()
    p = prepare(toks / "tok2", tmp_path / "wiki", "wiki", recipe, check=False)
    assert p.returncode == 2
    [line] = p.stderr.strip().splitlines()
    assert f"'plays' ({tmp_path / 'plays'})" in line and f"'wiki' ({tmp_path / 'wiki'})" in line
    assert "with the same --tokenizer" in line
    assert not (tmp_path / "wiki").exists() and recipe.read_text() == before
