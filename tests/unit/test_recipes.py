"""Recipes are package data (lmforge/recipes/): `--config` takes a YAML file or a packaged recipe name, the
source checkout's `configs/` is a link to the same files, and a name that is neither is a one-line error
listing the recipes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli.plan import _model_source
from lmforge.config import ConfigError, load_config_source, recipe_name, recipe_names, to_dict
from lmforge.tasks.config import load_config as load_finetune
from lmforge.train.config import load_config as load_pretrain

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "lmforge" / "recipes"
FILES = sorted(RECIPES.rglob("*.yaml"))


def load(name_or_path, stage):
    if stage == "finetune":
        return to_dict(load_finetune(str(name_or_path), ["run.dir=/tmp/x"]))
    return to_dict(load_pretrain(str(name_or_path), ["data.dir=/tmp/shards"]))


def stage_of(name: str) -> str:
    return "finetune" if name.startswith("finetune/") else "pretrain"


def test_recipe_names_are_the_yaml_files_under_lmforge_recipes():
    names = recipe_names()
    assert names == sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in FILES)
    assert {"quickstart", "pretrain/tiny", "pretrain/llama2-7b", "finetune/sft", "finetune/dpo"} <= set(names)


def test_configs_in_a_checkout_is_a_link_to_the_recipes():
    link = REPO / "configs"
    assert link.is_symlink() and Path(os.readlink(link)) == Path("lmforge/recipes")
    assert (link / "pretrain" / "tiny.yaml").read_bytes() == (RECIPES / "pretrain" / "tiny.yaml").read_bytes()


@pytest.mark.parametrize("name", [p.relative_to(RECIPES).with_suffix("").as_posix() for p in FILES])
def test_every_recipe_loads_by_name_as_from_its_file(name):
    stage = stage_of(name)
    from_file = load(RECIPES / f"{name}.yaml", stage)
    assert load(name, stage) == from_file
    assert load(f"recipe:{name}", stage) == from_file
    assert load(f"{name}.yaml", stage) == from_file


def test_a_checkout_path_names_the_recipe_where_no_such_file_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # like an installed wheel: no configs/ folder here
    assert recipe_name("configs/pretrain/tiny.yaml") == "pretrain/tiny"
    assert recipe_name("lmforge/recipes/finetune/sft.yaml") == "finetune/sft"
    cfg = load_pretrain("configs/pretrain/tiny.yaml", ["data.dir=/tmp/shards"])
    assert cfg.run.dir == "runs/tiny"  # the default run dir still follows the recipe's file name
    assert to_dict(cfg) == load("pretrain/tiny", "pretrain") | {"run": to_dict(cfg.run)}


def test_an_existing_file_wins_over_a_recipe_of_the_same_name_unless_recipe_is_said(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "tiny.yaml").write_text("model:\n  preset: small\n")
    assert load_config_source("pretrain/tiny.yaml") == {"model": {"preset": "small"}}
    assert recipe_name("pretrain/tiny.yaml") is None
    assert load_config_source("recipe:pretrain/tiny")["model"]["preset"] == "tiny"


@pytest.mark.parametrize("arg", ["pretrain/nope", "recipe:nope", "nope.yaml", "recipe:../pyproject"])
def test_neither_a_file_nor_a_recipe_is_one_line_listing_the_recipes(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_pretrain(arg, ["data.dir=/tmp/shards"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config '{arg}' does not exist as a YAML file and is not a packaged recipe")
    assert all(name in msg for name in recipe_names())


def test_the_cli_runs_a_recipe_by_name_and_refuses_an_unknown_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "pretrain/tinyy"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith("error: config 'pretrain/tinyy' does not exist as a YAML file and is not a packaged recipe")
    # a recipe by name gets as far as its data: the config itself was read and validated
    ok = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "recipe:pretrain/tiny",
                         f"data.dir={tmp_path / 'no-shards'}", f"run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120, check=False)
    assert ok.returncode == 2 and "no-shards" in ok.stderr and "does not exist as a YAML file" not in ok.stderr, ok.stderr


def test_the_planner_reads_a_recipe_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = _model_source("pretrain/llama2-7b")
    by_file = _model_source(str(RECIPES / "pretrain" / "llama2-7b.yaml"))
    assert by_name[0] == by_file[0] and by_name[2] == by_file[2]
    assert by_name[2]["seq_len"] == 4096 and by_name[2]["micro_batch"] == 2
    assert _model_source("llama2-7b") == ("llama2-7b", "llama2-7b", {})  # a preset name stays a preset
