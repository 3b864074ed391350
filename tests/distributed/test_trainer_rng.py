"""Dropout streams follow the data-parallel rank: tensor-parallel peers (which hold the same replicated
activations) draw the same masks, so their residual streams and replicated parameters stay bitwise
identical (the parameters alone would not show it: DTensor all-reduces a replicated norm's gradient); after a resume
on another world size every rank's stream is derived from (seed, step, dp rank), never copied from
rank 0, and the data stream continues without repeats."""

from __future__ import annotations

import json

import _dist_harness as h
import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_tp_peers_stay_identical_with_dropout(tmp_path):
    data = h.write_token_dir(tmp_path / "data")
    out = tmp_path / "tp.json"
    h.spawn(2, "_trainer_jobs:tp_dropout", run_dir=str(tmp_path / "run"), data_dir=str(data), steps=4, out=str(out))
    report = json.loads(out.read_text())
    assert report["replicated"] > 0, "no replicated parameter to compare"
    assert report["steps"] == [True] * 4, report  # replicated parameters (norms), bitwise
    assert report["activations"] == [True] * 4, report  # the dropped-out residual stream, bitwise


def test_resume_on_2_then_4_then_1_ranks_derives_distinct_streams(tmp_path):
    from lmforge.train.checkpoint import read_meta

    data = h.write_token_dir(tmp_path / "data")
    run = tmp_path / "run"
    masks = {}
    for world, steps in ((2, 2), (4, 4), (1, 6)):
        out = tmp_path / f"masks{world}.json"
        parallel = {"dp_shard": world} if world > 1 else {}
        if world > 1:
            h.spawn(world, "_trainer_jobs:dropout_masks", run_dir=str(run), data_dir=str(data), steps=steps,
                    parallel=parallel, out=str(out))
        else:
            h.spawn(1, "_trainer_jobs:dropout_masks", run_dir=str(run), data_dir=str(data), steps=steps,
                    parallel=parallel, out=str(out))
        masks[world] = json.loads(out.read_text())
        assert read_meta(run / "checkpoints" / f"step_{steps:06d}")["world_size"] == world
    for world in (2, 4):
        assert len({tuple(m) for m in masks[world]}) == world, f"{world} ranks drew identical dropout masks"
    # data: 6 steps of 8 windows, each read once, across the three segments
    windows = h.windows_by_step(run)
    flat = [w for ws in windows.values() for w in ws]
    assert len(windows) == 6 and len(flat) == 6 * h.BATCH_T and len(set(flat)) == len(flat)
