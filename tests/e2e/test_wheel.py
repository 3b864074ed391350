"""The built wheel is what `pip install lmforge` gets: it must carry the package data (the recipes, the safety
prompts, the chat page) and no tests, and an install of it must run a recipe by name."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "lmforge"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy, so that the build leaves no build/ or *.egg-info in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(PKG, src / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (whl,) = out.glob("lmforge-*.whl")
    return whl


def source_files(pattern: str) -> set[str]:
    return {p.relative_to(REPO).as_posix() for p in PKG.glob(pattern) if p.is_file()}


def test_the_wheel_holds_the_package_data_and_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = source_files("recipes/**/*.yaml")
    assert {"lmforge/recipes/quickstart.yaml", "lmforge/recipes/pretrain/tiny.yaml",
            "lmforge/recipes/finetune/sft.yaml"} <= recipes
    for group in (recipes, source_files("eval/safety_data/*.jsonl"), source_files("serve/static/*"),
                  source_files("dashboard/static/*"),
                  source_files("**/*.py")):
        assert group and group <= names, sorted(group - names)
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n or Path(n).name.startswith("test_")]
    assert all(n.startswith(("lmforge/", "lmforge-")) for n in names), sorted(names)


def test_an_installed_wheel_runs_a_recipe_by_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel unpacked is its installed layout
    work = tmp_path / "work"  # no configs/ folder here: only the package data can answer
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import lmforge.config as c; print(c.__file__); print(','.join(c.recipe_names()))"
    p = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    where, names = p.stdout.strip().splitlines()
    assert Path(where).is_relative_to(site)
    assert names.split(",") == sorted(Path(n).relative_to("lmforge/recipes").with_suffix("").as_posix()
                                      for n in source_files("recipes/**/*.yaml"))
    run = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "configs/pretrain/tiny.yaml",
                          f"data.dir={work / 'no-shards'}"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    # the recipe was read and validated; the run stops at its (missing) data, before writing anything
    assert run.returncode == 2 and "no-shards" in run.stderr and "does not exist as a YAML file" not in run.stderr, run.stderr
    assert not (work / "runs").exists()
