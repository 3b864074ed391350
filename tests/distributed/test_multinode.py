"""Multi-node launch (issue 10, item 8): two torchrun agents (``--nnodes 2 --nproc_per_node 1``, c10d
rendezvous on 127.0.0.1) run `lmforge pretrain` exactly as one 2-process node does.

The model is FSDP2-sharded over the 2 ranks, so this also drives sharded initialization through the real
pretraining recipe and Trainer; the 1-process run (no process group, the full model) gives the same losses.
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

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_two_agents_equal_one_two_process_node(tmp_path):
    data = h.write_token_dir(tmp_path / "data")
    cfg = h.trainer_config_dict(tmp_path / "unused", data, STEPS, {"dp_shard": -1, "timeout_s": 120},
                                checkpoint={"interval": 0}, train={"threads": 1, "resume": "never"})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    pretrain = ["-m", "lmforge", "pretrain", "--config", str(config)]
    logs = []

    def check(proc, name):
        logs.append(f"== {name} (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}")
        (tmp_path / "launch.log").write_text("\n".join(logs))
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"

    # One node, 2 processes.
    one_node = tmp_path / "one_node"
    check(subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2", *pretrain, f"run.dir={one_node}"),
                         env=_env(), capture_output=True, text=True, timeout=600, check=False), "one node")

    # Two nodes of 1 process each: two agents meet at the c10d rendezvous on 127.0.0.1.
    two_nodes = tmp_path / "two_nodes"
    port = h.free_port()
    agents = [subprocess.Popen(_torchrun("--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                                         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lmforge-test",
                                         "--local-addr", "127.0.0.1", *pretrain, f"run.dir={two_nodes}"),
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for i, agent in enumerate(agents):
        try:
            out, err = agent.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            raise
        check(subprocess.CompletedProcess(agent.args, agent.returncode, out, err), f"agent {i}")

    # One process, no process group, the full model.
    single = tmp_path / "single"
    check(subprocess.run([sys.executable, *pretrain, f"run.dir={single}", "parallel.dp_shard=1"], env=_env(),
                         capture_output=True, text=True, timeout=600, check=False), "single process")

    assert "model: sharded init (seed 0) on the meta device, materialized each rank its shards" in "".join(logs[1:3])
    ref, got, alone = _losses(one_node), _losses(two_nodes), _losses(single)
    assert sorted(ref) == list(range(1, STEPS + 1)), ref
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
        assert abs(alone[step] - ref[step]) <= 1e-5, (step, alone[step], ref[step])
    assert json.loads((two_nodes / "model" / "config.json").read_text())["model"]["vocab_size"] == h.VOCAB_T
