"""Failure behaviour: a rank that dies (or fails) makes the others exit within the process-group
timeout, with a message naming it; torchrun --max-restarts + train.resume=auto finishes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _dist_harness as h
import pytest
import yaml

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _env(rank: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_pair(mode: str, victim: int, timeout_s: float):
    port = h.free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "_failure_worker.py"), mode, str(victim), str(timeout_s)],
                              env=_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung instead of exiting ({mode}, victim {victim})")
        out.append((p.returncode, err, time.time()))
    return out


def _failed_at(err: str) -> float:
    line = next(ln for ln in err.splitlines() if ln.startswith("victim rank"))
    return float(line.rsplit(":", 1)[1])


@pytest.mark.parametrize("mode,victim", [("kill", 1), ("raise", 1), ("kill", 0)])
def test_survivor_exits_within_timeout_naming_the_dead_rank(mode, victim):
    timeout_s = 20.0
    results = _run_pair(mode, victim, timeout_s)
    survivor = 1 - victim
    rc, err, ended = results[survivor]
    died_at = _failed_at(results[victim][1])
    assert rc == 75, f"survivor rank {survivor} exited {rc}: {err[-2000:]}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert lines, err[-2000:]
    assert f"rank {victim}" in lines[-1] and f"rank {survivor} exits" in lines[-1], lines[-1]
    if mode == "raise":
        assert "failed: RuntimeError: boom at step 5" in lines[-1]
    assert "Traceback" not in err, "the survivor should exit with one line, not a traceback"
    assert ended - died_at < timeout_s, f"survivor took {ended - died_at:.1f}s (timeout {timeout_s}s)"
    if mode == "kill":
        assert results[victim][0] == -9


@pytest.mark.slow
def test_torchrun_max_restarts_with_resume_auto_finishes_the_run(tmp_path):
    data = h.write_token_dir(tmp_path / "data")
    run_dir = tmp_path / "run"
    cfg = h.trainer_config_dict(run_dir, data, 6, {"timeout_s": 60}, checkpoint={"interval": 2, "keep_last": 5},
                                train={"threads": 1})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    marker = tmp_path / "failed_once"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", str(HERE / "_torchrun_worker.py"), str(config),
           str(marker)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    (tmp_path / "torchrun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.read_text().startswith("attempt 0"), "rank 1 should have failed in the first attempt"
    assert "finished at step 6" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # the failed attempt's rows past the checkpoint were dropped
    events = [r["event"] for r in rows if r.get("kind") == "event"]
    assert "resume" in events
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000006"
    assert (run_dir / "model" / "config.json").is_file()
    # The resumed run continued the data stream: the uninterrupted single-process run reads the same.
    h.run_trainer(tmp_path / "ref", data, 6)
    ref = h.train_losses(tmp_path / "ref")
    got = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
