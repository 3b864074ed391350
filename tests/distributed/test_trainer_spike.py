"""Loss-spike rollback on 1 and 2 ranks through the real task (`lmforge.tasks.run`) and the real CLI (one
process per rank, gloo): a poisoned data window makes step 8 spike; the run rolls back to the checkpoint of
step 6, skips exactly the samples steps 7 and 8 read (named in the event row), and from there equals a run
whose data never held them. A loss hook on ONE rank makes every rank stop together (``action: stop``) or
roll back until ``max_rollbacks`` stops them; ``skip`` skips the step on every rank.
The single-process details (lr factor, non-finite, state in checkpoints): tests/unit/test_spike.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _dist_harness as h
import pytest
import torch
import yaml
from _spike_data import patch_loader, read_order, write_poisoned_token_dir

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS, SPIKE, CKPT = 11, 8, 6  # the poisoned batch is step 8's; checkpoints every 3 steps
B = h.BATCH_T
SKIPPED = [CKPT * B, SPIKE * B]  # the global samples steps 7 and 8 read


def _config(tmp_path: Path, run_dir: Path, data: Path, parallel: dict, **spike) -> Path:
    spike = {"action": "rollback", "metric": "both", "window": 10, "min_history": 3, "k": 6.0, **spike}
    cfg = h.trainer_config_dict(run_dir, data, STEPS, {"timeout_s": 120, **parallel},
                                checkpoint={"interval": 3, "keep_last": 10},
                                train={"threads": 1, "spike": spike}, optim={"lr": 1e-2},
                                eval={"batches": 0, "interval": 0, "at_start": False}, model={"dropout": 0.0})
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _launch(config: Path, world: int, hook: str | None = None, record: Path | None = None):
    port = h.free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.pop("LMFORGE_TEST_HOOK", None)
        env.pop("LMFORGE_TEST_RECORD", None)
        if hook:
            env["LMFORGE_TEST_HOOK"] = hook
        if record:
            env["LMFORGE_TEST_RECORD"] = str(record)
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


def _events(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "event" and r.get("event") == "spike"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from lmforge.artifacts.model_dir import load_weights

    return load_weights(run_dir / "model")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (a run whose stream skips the samples) and the 1-rank rollback run, in this process."""
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    root = tmp_path_factory.mktemp("spike")
    data = root / "data"
    poisoned = write_poisoned_token_dir(data, (SPIKE - 1) * B, B)
    with pytest.MonkeyPatch.context() as mp:
        (root / "ref").mkdir()
        patch_loader(mp, root / "ref", skip=tuple(SKIPPED))
        run(load_config(str(_config(root, root / "ref", data, {}))))
    with pytest.MonkeyPatch.context() as mp:
        (root / "one").mkdir()
        patch_loader(mp, root / "one")
        run(load_config(str(_config(root, root / "one", data, {}))))
    return root, data, poisoned


def _check_rollback(root: Path, name: str, poisoned: list[int], tol: float) -> None:
    run_dir, ref_dir = root / name, root / "ref"
    (e,) = _events(run_dir)
    assert (e["action"], e["step"], e["spike_step"], e["checkpoint"], e["skipped_steps"], e["skipped_samples"]) == \
        ("rollback", CKPT, SPIKE, f"step_{CKPT:06d}", [CKPT + 1, SPIKE], SKIPPED), e
    assert e["metric"] == "grad_norm" and e["value"] > e["threshold"]
    order = read_order(run_dir)
    # steps 1..8 read samples 0..63 (the last batch is the poisoned one); after the rollback, 64.. on
    assert [s for s, _ in order] == [i * B for i in range(SPIKE)] + [i * B for i in range(SPIKE, SPIKE + STEPS - CKPT)]
    assert order[SPIKE - 1][1] == sorted(poisoned)
    skipped = {w for s, ws in order if SKIPPED[0] <= s < SKIPPED[1] for w in ws}
    after = [w for s, ws in order[SPIKE:] for w in ws]
    assert skipped.isdisjoint(after) and len(after) == len(set(after))
    # the run after the rollback reads what the reference reads, and trains to the same losses and weights
    ref_order = read_order(ref_dir)
    assert order[:CKPT] + order[SPIKE:] == ref_order
    ref, got = h.train_losses(ref_dir), h.train_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert abs(got[step] - ref[step]) <= tol, (step, got[step], ref[step])
    a, b = _weights(ref_dir), _weights(run_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=max(tol, 1e-6) * 10, msg=k)


def test_one_rank_rollback_skips_the_poisoned_windows_and_equals_a_run_without_them(runs):
    root, _, poisoned = runs
    _check_rollback(root, "one", poisoned, tol=0.0)


def test_two_rank_rollback_through_the_cli(runs, tmp_path):
    root, data, poisoned = runs
    run_dir = root / "two"
    run_dir.mkdir()
    results = _launch(_config(tmp_path, run_dir, data, {"dp_shard": 2}), 2, record=run_dir)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert f"rolled back to {run_dir / 'checkpoints' / f'step_{CKPT:06d}'}" in results[0][2]
    assert "rolled back" not in results[1][2]  # notes come from rank 0 only
    _check_rollback(root, "two", poisoned, tol=1e-5)


def test_two_ranks_stop_together_on_a_spike_one_rank_sees(runs, tmp_path):
    data = runs[1]
    run_dir = tmp_path / "stop"
    results = _launch(_config(tmp_path, run_dir, data, {"dp_shard": 2}, action="stop"), 2, hook="loss:1:4:60")
    assert [rc for rc, _, _ in results] == [2, 2], results[1][2][-3000:]
    assert "loss spike at step 5 (train.spike.action=stop)" in results[0][2], results[0][2][-2000:]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000005"
    assert not (run_dir / "model").exists()
    assert [(e["action"], e["step"]) for e in _events(run_dir)] == [("stop", 5)]
    assert sorted(h.train_losses(run_dir)) == [1, 2, 3, 4, 5]


def test_two_ranks_skip_and_bounded_rollbacks(runs, tmp_path):
    data = runs[1]
    skip_dir = tmp_path / "skip"
    results = _launch(_config(tmp_path, skip_dir, data, {"dp_shard": 2}, action="skip", metric="loss"), 2,
                      hook="loss:0:4:60")
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert [(e["action"], e["step"], e["skipped_in_a_row"]) for e in _events(skip_dir)] == [("skip", 5, 1)]
    assert sorted(h.train_losses(skip_dir)) == list(range(1, STEPS + 1))  # the skipped step counts as a step
    assert (skip_dir / "model" / "config.json").is_file()

    bound_dir = tmp_path / "bound"
    results = _launch(_config(tmp_path, bound_dir, data, {"dp_shard": 2}, max_rollbacks=2), 2,
                      hook="loss:1:3+:60")
    assert [rc for rc, _, _ in results] == [2, 2], results[0][2][-3000:]
    assert "after 2 rollbacks (train.spike.max_rollbacks=2)" in results[0][2]
    assert [(e["action"], e["step"], e["spike_step"]) for e in _events(bound_dir)] == \
        [("rollback", 3, 4), ("rollback", 3, 4), ("stop", 4, 4)]


def test_the_docs_demo(tmp_path):
    """The figures docs/guide/pretraining.md ("Loss spikes") quotes from `_spike_demo.py`."""
    from _spike_demo import main

    f = main(tmp_path / "demo", None)
    assert (f["spike_step"], f["rolled_back_to"], f["skipped_samples"], f["rollbacks"]) == (55, 50, [400, 440], 1)
    assert f["spike_loss"] > 9 and f["threshold"] < 1.5 and f["loss_before"] < 0.5
    assert f["max_abs_diff_rollback_vs_clean"] == 0.0
    assert f["final_loss"]["rollback"] == f["final_loss"]["clean"] != f["final_loss"]["none"]
    assert (tmp_path / "demo" / "rollback" / "report.png").is_file()
