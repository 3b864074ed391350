"""`lmforge quickstart` end to end, scaled down (tiny preset, 1.5 MB of stdlib sources, ~15 s of
training): every stage runs, validation loss falls, a sample and a report are written, and a
re-run resumes instead of starting over. The full-size run is `make quickstart`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def quickstart(out, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(out), "--minutes", "0.1",
                        "--preset", "tiny", "--data-mb", "1.5", "--json", *extra], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout), p.stderr


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    first, log = quickstart(out)
    return out, first, log


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_a_rerun_resumes(first_run):
    out, first, log = first_run
    assert "standard-library files" in log and "training a 4,096-token BPE tokenizer" in log
    assert first["steps"] >= 20 and first["stop_reason"] == "max_steps" and first["resumed_from"] is None
    assert first["final_val_loss"] < first["first_val_loss"] - 0.5, first
    assert first["sample"].startswith("import os\n") and len(first["sample"]) > 20
    for name in ("model/config.json", "model/tokenizer.json", "report.png", "report.md", "config.yaml",
                 "data/shards/index.json", "checkpoints/LATEST"):
        assert (out / name).is_file(), name
    assert "## Sample" in (out / "report.md").read_text()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == first["steps"] and cfg["model"]["preset"] == "tiny"

    again, log = quickstart(out)
    assert "tokenizer exists" in log and "token shards exist" in log and "resumed from" in log
    assert again["resumed_from"].endswith(f"step_{first['steps']:06d}") and again["steps"] == first["steps"]
    assert again["final_val_loss"] == first["final_val_loss"]


def deep_update(base, changes):
    for key, value in changes.items():
        if isinstance(value, dict):
            deep_update(base.setdefault(key, {}), value)
        else:
            base[key] = value
    return base


@pytest.mark.slow
def test_quickstart_trains_the_recipe_file_with_its_documented_overrides(first_run):
    """RUN/config.yaml (what the run trained with, every key resolved) is the packaged recipe file
    lmforge/recipes/quickstart.yaml with only the overrides the quickstart documents: its output and data
    dirs, the model preset (the squared-ReLU width at 1.5x the preset's SwiGLU width), the step count fitted to
    --minutes, the warmup and eval/checkpoint intervals scaled to it, the time guard, and on a GPU bf16 and
    batch 64. A value the quickstart takes from anywhere but the file makes this fail."""
    import torch

    from lmforge.config import from_dict, to_dict
    from lmforge.models.presets import get_preset
    from lmforge.train.config import PretrainConfig

    out, first, _ = first_run
    recipe = yaml.safe_load((REPO / "lmforge" / "recipes" / "quickstart.yaml").read_text())
    steps = first["steps"]
    tiny = get_preset("tiny")
    assert tiny.activation == "swiglu"
    overrides = {
        "run": {"dir": str(out)},
        "model": {"preset": "tiny", "ffn_hidden": tiny.hidden_dim * 3 // 2},
        "data": {"dir": str(out / "data" / "shards")},
        "train": {"max_steps": steps, "time_limit_minutes": 3.0},  # max(1.5 x 0.1 min + 0.5, 3)
        "schedule": {"warmup_steps": max(1, min(recipe["schedule"]["warmup_steps"], steps // 10))},
        "eval": {"interval": max(5, steps // 4)},
        "checkpoint": {"interval": max(5, steps // 4)},
    }
    if torch.cuda.is_available():
        overrides["train"].update(precision="bf16", global_batch=64, micro_batch=64)
    cfg = from_dict(PretrainConfig, deep_update(recipe, overrides))
    want = to_dict(cfg)
    # what pretraining itself resolves when it writes config.yaml: the model section spelled out in full and
    # the tokenizer the shard index names
    want["model"] = {"preset": "tiny", **to_dict(cfg.model_config())}
    want["data"]["tokenizer"] = str(out / "data" / "tokenizer")
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == want
    # the recipe's own choices, not the defaults, are what trained
    assert (written["optim"]["name"], written["schedule"]["name"], written["model"]["activation"]) == \
        ("muon", "wsd", "relu2")


def test_quickstart_rejects_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(tmp_path / "q"), "--minutes", "0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --minutes=0.0 must be positive")
