"""`SMOKE=1 bash bench/gpu_check.sh` on CPU (gloo, tiny shapes): the device check itself works, also with only
the packages the GPU machines have (DEVICE_ONLY=1 blocks every other one), and a failed probe stops it early.
The model pick of the memory part is the planner's (a 7B full fine-tune only where it says it fits)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS_JSON = ("probe", "throughput", "memory", "write8b", "load8b", "gpu_planner_check")


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable, LMFORGE_DEVICE_ONLY_DIR=str(out.parent),
                **env)
    full.pop("RANK", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=900, check=False)


def _check_outputs(out: Path, res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in PARTS_JSON:
        assert (out / f"{name}.json").is_file(), (name, res.stdout[-3000:])
    probe = json.loads((out / "probe.json").read_text())
    assert probe["ok"] and {c["name"] for c in probe["checks"]} >= {
        "all_reduce", "dtensor_foreach_div", "distribute_tensor_src_data_rank", "flex_attention", "matmul"}
    assert all(c["ok"] for c in probe["checks"]), probe["checks"]
    memory = json.loads((out / "memory.json").read_text())
    assert [s["step"] for s in memory["steps"]] == [1, 2] and memory["planner"]["fits"]
    load = json.loads((out / "load8b.json").read_text())
    assert load["logits_max_abs_diff"] == 0.0
    assert not (out / "model8b").exists()  # removed unless KEEP_MODEL=1
    summary = (out / "summary.txt").read_text()
    for line in ("probe: ", "throughput: ", "memory: ", "load8b: ", "planner-check "):
        assert line in summary, summary


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    _check_outputs(out, _run(out, PARTS="all"))


@pytest.mark.slow
def test_smoke_runs_with_only_the_device_packages(tmp_path):
    """torch, numpy, pyyaml, safetensors, pytest: every other import (transformers, tokenizers, rich, ...) is
    absent, as on the GPU machines."""
    out = tmp_path / "out"
    res = _run(out, PARTS="all", DEVICE_ONLY="1")
    _check_outputs(out, res)
    assert "gpu-tests ok" in res.stdout, res.stdout[-2000:]  # pytest itself ran (the tests skip without CUDA)
    blocked = set((out / "blocked_imports.txt").read_text().split())
    assert "tqdm" in blocked or "pydot" in blocked  # the blocker was on: torch's own optional imports were absent
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'bench' / 'device_only'}{os.pathsep}{ROOT}",
               LMFORGE_DEVICE_ONLY_DIR=str(tmp_path))
    probe = ("import importlib.util as u; "
             "print([m for m in ('transformers', 'tokenizers', 'rich', 'fastapi', 'ray', 'mlflow', 'wandb', 'torch', "
             "'numpy', 'yaml', 'safetensors', 'pytest') if u.find_spec(m) is not None])")
    seen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert seen.stdout.strip() == "['torch', 'numpy', 'yaml', 'safetensors', 'pytest']", seen.stdout + seen.stderr


def test_a_failed_probe_stops_the_check_with_one_line(tmp_path):
    out = tmp_path / "out"
    res = _run(out, PARTS="throughput", GPU_CHECK_FAIL="dtensor_foreach_div")
    assert res.returncode == 3, res.stdout[-2000:]
    assert "the probe failed, nothing else was run: probe FAILED: dtensor_foreach_div: RuntimeError" in res.stdout
    assert not (out / "throughput.json").exists()
    assert json.loads((out / "probe.json").read_text())["failed"] == ["dtensor_foreach_div"]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mem_gib, want", [(79.2, "3b"), (139.8, "llama2-7b"), (44.0, "1b")])
def test_memory_part_runs_the_largest_model_the_planner_says_fits(mem_gib, want):
    """An H100 (79.2 GiB) does not get llama2-7b with fp32 AdamW (planned ~113 GB); an H200 does."""
    name, plan, tried = _gpu_check_module().pick_memory_model(mem_gib, 4096, smoke=False)
    assert name == want, tried
    assert plan["fits"] and plan["memory_peak_gb"]["device"] <= mem_gib
    assert all(not t["fits"] for t in tried[:-1]) and tried[-1]["model"] == want


def test_part_timeouts_fit_the_device_lease():
    """The default parts' timeouts (probe included) sum to <= 8 minutes, PARTS=all to <= 10."""
    import re

    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    limits = {name: int(t) for name, t in re.findall(r"run_part ([a-z0-9-]+) (\d+) ", script)}
    assert set(limits) == {"probe", "throughput", "memory", "write8b", "load8b", "gpu-tests", "planner", "ckpt1b"}
    default = sum(v for k, v in limits.items() if k not in ("planner", "ckpt1b"))  # ckpt1b: only when named
    assert default <= 480 and default + limits["planner"] <= 600, limits
    assert limits["probe"] + limits["ckpt1b"] <= 600, limits  # PARTS=ckpt1b alone fits one device call
