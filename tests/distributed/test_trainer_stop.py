"""Stopping is a collective decision: a signal or the time limit seen by ONE rank stops every rank at the
same step, with the same checkpoint and the same exit code (SIGTERM 143, SIGINT 130, time limit 124),
no RUN/model for the stopped run, and a resume that continues exactly.

Ranks are started one process each (RANK/WORLD_SIZE as torchrun sets them) through the real CLI, so
each rank's exit code is visible; `_trainer_cli_worker.py` holds the test hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist_harness as h
import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = 7


def _config(tmp_path: Path, run_dir: Path, data: Path, parallel: dict) -> Path:
    cfg = h.trainer_config_dict(run_dir, data, STEPS, {"timeout_s": 120, **parallel},
                                checkpoint={"interval": 0, "keep_last": 10}, train={"threads": 1, "time_limit_minutes": 600},
                                eval={"batches": 2, "interval": 0, "at_start": False},
                                model={"dropout": 0.0})
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, world: int, hook: str | None = None) -> list[tuple[int, str, str]]:
    port = h.free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.pop("LMFORGE_TEST_HOOK", None)
        if hook:
            env["LMFORGE_TEST_HOOK"] = hook
        procs.append(subprocess.Popen([sys.executable, str(HERE / "_trainer_cli_worker.py"), "pretrain", "--config",
                                       str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a rank hung ({hook})")
        out.append((p.returncode, stdout, stderr))
    return out


def _latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "LATEST").read_text().strip()


def _losses(run_dir: Path) -> dict[int, float]:
    return h.train_losses(run_dir)


def test_one_rank_stopping_stops_every_rank_at_the_same_step_and_the_resume_is_exact(tmp_path):
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    data = h.write_token_dir(tmp_path / "data")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run(load_config(str(_config(tmp_path, ref_dir, data, {}))))  # uninterrupted, one process
    config = _config(tmp_path, run_dir, data, {"dp_shard": 2})

    # hook "KIND:RANK:STEP": that rank alone sees it while training step STEP+1; all stop after that step
    legs = [("SIGTERM:1:1", 143, 2), ("clock:1:3", 124, 4), ("SIGINT:0:4", 130, 5)]
    for hook, code, stop_step in legs:
        results = _launch(config, 2, hook)
        codes = [rc for rc, _, _ in results]
        assert codes == [code, code], f"{hook}: exit codes {codes}\n{results[0][2][-3000:]}\n{results[1][2][-3000:]}"
        assert _latest(run_dir) == f"step_{stop_step:06d}", hook
        assert not (run_dir / "model").exists(), f"{hook}: a stopped run must not leave RUN/model"
        summaries = [line for _, out, _ in results for line in out.splitlines() if line.startswith("pretrain:")]
        assert len(summaries) == 1 and f"at step {stop_step}" in summaries[0], summaries
        assert "no model written" in summaries[0]
        for _, _, err in results:
            assert "Traceback" not in err, err[-3000:]
        ends = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert ends[-1]["event"] == "end" and ends[-1]["step"] == stop_step
    results = _launch(config, 2)  # the re-run resumes and finishes
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert _latest(run_dir) == f"step_{STEPS:06d}" and (run_dir / "model" / "config.json").is_file()

    ref, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
