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


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "qs"
    first, log = quickstart(out)
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


def test_quickstart_config_file_matches_the_embedded_one():
    from lmforge.tasks.quickstart import QUICKSTART_CONFIG

    on_disk = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    for section, values in QUICKSTART_CONFIG.items():
        for key, value in values.items():
            assert on_disk[section][key] == value, f"{section}.{key}"


def test_quickstart_rejects_bad_arguments(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(tmp_path / "q"), "--minutes", "0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: --minutes=0.0 must be positive")
