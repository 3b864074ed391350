"""Continued pretraining from a model dir (`model.from`): the weights are read into the already-sharded
model under torchrun (each rank its slices), and the run equals the same continuation in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist_harness as h
import pytest
import yaml

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def _run(cmd: list[str], log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_continued_pretraining_from_model_dir_two_ranks_equals_one(tmp_path):
    data = h.write_token_dir(tmp_path / "data")
    base = tmp_path / "base"
    cfg = h.trainer_config_dict(base, data, 4, {"timeout_s": 120}, checkpoint={"interval": 0},
                                train={"threads": 1, "resume": "never"})
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(cfg))
    lm = [sys.executable, "-m", "lmforge", "pretrain"]
    _run([*lm, "--config", str(config)], tmp_path / "base.log")
    assert (base / "model" / "config.json").is_file()

    cont = dict(cfg, model={"from": str(base / "model")})
    cont_cfg = tmp_path / "cont.yaml"
    cont_cfg.write_text(yaml.safe_dump(cont))
    one = tmp_path / "one"
    _run([*lm, "--config", str(cont_cfg), f"run.dir={one}"], tmp_path / "one.log")
    two = tmp_path / "two"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmforge",
          "pretrain", "--config", str(cont_cfg), f"run.dir={two}", "parallel.dp_shard=2"], tmp_path / "two.log")

    fresh, ref, got = _losses(base), _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    assert ref[1] < fresh[1] - 0.01, "the continuation should start from the trained weights, not a fresh init"
    meta = json.loads((two / "model" / "config.json").read_text())
    assert meta["continued_from"] == str((base / "model").resolve())


def test_model_from_refuses_architecture_keys_and_missing_dirs(tmp_path):
    from lmforge.config import ConfigError
    from lmforge.train.config import load_config

    data = h.write_token_dir(tmp_path / "data")
    cfg = h.trainer_config_dict(tmp_path / "run", data, 2)
    cfg["model"] = {"from": str(tmp_path / "nowhere")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="model.from=.*nowhere.* is not a directory"):
        load_config(str(path))
    (tmp_path / "nowhere").mkdir()
    cfg["model"] = {"from": str(tmp_path / "nowhere"), "dim": 64}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="drop model.dim"):
        load_config(str(path))
