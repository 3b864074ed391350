"""`lmforge plan` end to end: JSON keys, speed, no torch import, recipes and model dirs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=60)


def test_issue_command_json_keys_and_speed():
    t0 = time.perf_counter()
    r = lmforge("plan", "--model", "llama2-7b", "--gpus", "8", "--gpu-mem-gb", "80", "--json", "--tokens", "2T")
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["params"] == 6_738_415_616 and isinstance(plan["fits"], bool)
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        assert plan["memory_gb"][key] > 0
    assert plan["flops"]["per_token"] > 0 and plan["hours"] > 0 and plan["tokens"] == 2e12
    assert wall < 5, f"lmforge plan took {wall:.2f}s (interpreter start included)"


def test_plan_never_imports_torch():
    code = ("import sys; from lmforge.cli import main; "
            "main(['plan', '--model', 'llama3-8b', '--gpus', '16', '--suggest', '--json']); "
            "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO_TORCH')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().endswith("NO_TORCH")
    assert json.loads(r.stdout)["suggested"] is True


def test_summary_line_and_hours_without_json():
    r = lmforge("plan", "--model", "llama2-7b", "--gpus", "8", "--tokens", "1e12")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) == 1 and "GB per GPU of 80" in out[0] and "GPU-hours" in out[0]


def test_recipe_yaml_supplies_defaults():
    r = lmforge("plan", "--model", "configs/pretrain/llama2-7b.yaml", "--gpus", "8", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["model"] == "llama2-7b" and plan["seq_len"] == 4096 and plan["micro_batch"] == 2


def test_model_dir_config_json(tmp_path):
    from lmforge.config import to_dict
    from lmforge.models.presets import get_preset

    (tmp_path / "config.json").write_text(json.dumps(to_dict(get_preset("small"))))
    r = lmforge("plan", "--model", str(tmp_path), "--json", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["params"] == get_preset("small").num_params()


@pytest.mark.parametrize("args, message", [
    (["--model", "llama2-7b", "--gpus", "8", "--tp", "3"], "does not divide --gpus 8"),
    (["--model", "nope-7b"], "unknown model preset"),
    (["--model", "llama2-7b", "--gpu", "h300"], "did you mean 'h200'"),
    (["--model", "llama2-7b", "--seq-len", "9000"], "max_seq_len"),
])
def test_errors_exit_2_with_one_line(args, message):
    r = lmforge("plan", *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
