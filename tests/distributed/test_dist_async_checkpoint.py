"""`checkpoint.async` on 2 gloo ranks with FSDP2-sharded state: the background saves write every rank's
shards, rank 0 publishes (manifest, LATEST) only after every rank's shards are on disk, the digests taken
while writing equal the files' sha256, a save waits for the one in flight, and the checkpoints resume
exactly on 2 ranks and on 1."""

from __future__ import annotations

import hashlib
import json
import shutil

import _dist_harness as h
import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, HALF = 6, 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    data = h.write_token_dir(root / "data")
    torch.manual_seed(0)
    h.run_trainer(root / "ref", data, STEPS)  # uninterrupted, one process, synchronous saves
    h.spawn(2, "_async_ckpt_jobs:async_runs", root=str(root), data_dir=str(data), half=HALF, steps=STEPS)
    shutil.copytree(root / "two_async", root / "two_one_async")  # 2 -> 1
    h.run_trainer(root / "two_one_async", data, STEPS, checkpoint={"async": True, "interval": 2})
    return root


@pytest.mark.parametrize("name", ["two_two_async", "two_one_async"])
def test_async_checkpoints_resume_exactly(runs, name):
    from lmforge.artifacts.model_dir import load_weights

    ref, got = h.train_losses(runs / "ref"), h.train_losses(runs / name)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-5, f"step {step}: {got[step]} vs {ref[step]}"
    assert len({round(ref[s], 4) for s in range(HALF + 1, STEPS + 1)}) == STEPS - HALF
    w_ref, w = load_weights(runs / "ref" / "model"), load_weights(runs / name / "model")
    assert set(w) == set(w_ref)
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert h.windows_by_step(runs / name) == h.windows_by_step(runs / "ref")


def test_every_async_checkpoint_is_complete_and_its_digests_match_the_files(runs):
    from lmforge.train.checkpoint import MANIFEST, read_meta, verify_checkpoint

    ck = runs / "two_async" / "checkpoints"
    assert (ck / "LATEST").read_text().strip() == f"step_{HALF:06d}"
    steps = sorted(p.name for p in ck.glob("step_*"))
    assert steps == [f"step_{s:06d}" for s in range(1, HALF + 1)]
    for name in steps:
        assert verify_checkpoint(ck / name) is None
        files = json.loads((ck / name / MANIFEST).read_text())["files"]
        # both ranks' shards, both rank files, DCP's index, meta.json: hashed as written, equal to a re-read
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.json", "rank_00000.json",
                "rank_00001.json"} <= set(files)
        for f, entry in files.items():
            assert hashlib.sha256((ck / name / f).read_bytes()).hexdigest() == entry["sha256"], (name, f)
        assert read_meta(ck / name)["world_size"] == 2
    assert not [p for p in ck.iterdir() if p.name.startswith(".tmp_")]


def test_latest_moves_after_every_ranks_shards_and_a_second_save_waits(runs):
    events = []
    for p in runs.glob("probe_rank*.jsonl"):
        events += [json.loads(line) for line in p.read_text().splitlines()]
    latest = sorted(e["t"] for e in events if e["event"] == "latest")
    assert latest and all(e["rank"] == 0 for e in events if e["event"] == "latest")
    done1 = sorted(e["t"] for e in events if e["event"] == "shards_done" and e["rank"] == 1)
    assert len(latest) == len(done1) == HALF
    assert all(t_latest >= t_done for t_latest, t_done in zip(latest, done1))  # each LATEST after rank 1's shards
    rows = [json.loads(x) for x in (runs / "two_async" / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in rows if r.get("event") == "checkpoint"]
    assert [r["step"] for r in saves] == list(range(1, HALF + 1)) and all(r["async"] for r in saves)
    # rank 1 writes 0.5 s slower than a step takes: the saves of steps 2 and 3 waited for the one before
    assert saves[0]["wait_s"] == 0 and all(r["wait_s"] > 0.1 for r in saves[1:]), saves
    assert all(r["stall_s"] >= r["wait_s"] for r in saves)


@pytest.fixture
def slow_writes(monkeypatch):
    """Every background shard write takes 1 s longer (a slow disk)."""
    import time

    from lmforge.train import checkpoint as ckpt

    real = ckpt.HashingWriter.write_data

    def write_data(self, plan, planner):
        time.sleep(1.0)
        return real(self, plan, planner)

    monkeypatch.setattr(ckpt.HashingWriter, "write_data", write_data)


def test_a_time_limit_stop_waits_for_the_save_in_flight(tmp_path, slow_writes):
    from lmforge.train.checkpoint import verify_checkpoint

    data = h.write_token_dir(tmp_path / "data")
    res = h.run_trainer(tmp_path / "run", data, 50, checkpoint={"async": True, "interval": 0},
                        train={"time_limit_minutes": 1e-6})
    assert res.stop_reason == "time_limit" and res.exit_code == 124 and res.step < 50
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "LATEST").read_text().strip() == f"step_{res.step:06d}"  # the stop's save, complete on return
    assert verify_checkpoint(ck / f"step_{res.step:06d}") is None
    assert res.checkpoint == str(ck / f"step_{res.step:06d}")


def test_an_error_in_training_still_lets_the_save_in_flight_finish(tmp_path, slow_writes, monkeypatch):
    from lmforge.train.checkpoint import verify_checkpoint
    from lmforge.train.trainer import Trainer

    real = Trainer.train_step

    def boom(self, batch):
        if self.step == 2:
            raise RuntimeError("injected failure")
        return real(self, batch)

    monkeypatch.setattr(Trainer, "train_step", boom)
    data = h.write_token_dir(tmp_path / "data")
    with pytest.raises(RuntimeError, match="injected failure"):
        h.run_trainer(tmp_path / "run", data, 6, checkpoint={"async": True, "interval": 2})
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "LATEST").read_text().strip() == "step_000002"  # written while step 3 failed, then waited for
    assert verify_checkpoint(ck / "step_000002") is None
