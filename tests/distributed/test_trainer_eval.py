"""Evaluation on ranks that do not divide the evaluation set: 4 validation batches on 3 FSDP2 ranks
(each forward all-gathers, so uneven shares used to hang) finish, and the val losses equal the
1-process run on the same batches; the summary line is printed once (rank 0)."""

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

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _config(tmp_path: Path, name: str, data: Path, parallel: dict, **sections) -> Path:
    cfg = h.trainer_config_dict(tmp_path / name, data, STEPS, {"timeout_s": 120, **parallel},
                                train={"threads": 1, "global_batch": 6, "micro_batch": 2},
                                eval={"batches": 4, "batch_size": 2, "interval": 2, "at_start": True},
                                checkpoint={"interval": 0}, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _evals(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if r.get("kind") == "eval"}


def _torchrun(config: Path, n: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "lmforge", "pretrain", "--config", str(config)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_four_eval_batches_on_three_fsdp_ranks_equal_one_process(tmp_path):
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    data = h.write_token_dir(tmp_path / "data")
    run(load_config(str(_config(tmp_path, "one", data, {}))))
    proc = _torchrun(_config(tmp_path, "three", data, {"dp_shard": 3}), 3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("pretrain:")]
    assert len(summaries) == 1, proc.stdout
    ref, got = _evals(tmp_path / "one"), _evals(tmp_path / "three")
    assert sorted(got) == sorted(ref) == [0, 2, 4]
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
    # the evaluation changes as training goes on: the comparison is not of one constant
    assert len({round(v, 4) for v in ref.values()}) == 3
    notes = [line for line in proc.stderr.splitlines() if line.startswith("step 2: val loss")]
    assert len(notes) == 1, proc.stderr[-3000:]  # progress notes from rank 0 only
