"""A data.sources mixture resumes exactly across world sizes: a run saved on 2 ranks resumes on 1, one saved
on 1 resumes on 2, each continuing as the uninterrupted run (losses, per-source evaluation, the loader's
cursors) across a data.schedule phase change and a source that stops mid-run.

Ranks are started one process each (RANK/WORLD_SIZE as torchrun sets them) through the real CLI; the
1-process legs run in the test process through the same task entry point.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import _dist_harness as h
import numpy as np
import pytest
import yaml
from test_trainer_stop import _launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, HALF = 8, 4
SOURCES = {"web": (4000, 0.6, "repeat"), "code": (1500, 0.3, "repeat"), "books": (170, 0.1, "stop")}
SCHEDULE = [{"until_step": 5, "weights": {"web": 0.6, "code": 0.3, "books": 0.1}},
            {"until_step": 8, "weights": {"web": 0.1, "code": 0.3, "books": 0.6}, "interpolate": "linear"}]


def write_source(d: Path, n_tokens: int, seed: int) -> Path:
    from lmforge.data.shards import FORMAT

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = {"format": FORMAT, "version": 1, "tokenizer_hash": "sha256:test", "vocab_size": h.VOCAB_T,
             "dtype": "uint16", "eos_id": 0, "splits": {}}
    for split, n in (("train", n_tokens), ("val", 200)):
        blob = rng.integers(1, h.VOCAB_T, n).astype("uint16").tobytes()
        (d / f"{split}_00000.bin").write_bytes(blob)
        index["splits"][split] = {"tokens": n, "documents": 1, "shards": [
            {"file": f"{split}_00000.bin", "tokens": n, "documents": 1, "sha256": hashlib.sha256(blob).hexdigest()}]}
    (d / "index.json").write_text(json.dumps(index))
    return d


def config(root: Path, name: str, steps: int, parallel: dict) -> Path:
    cfg = h.trainer_config_dict(root / name, "unused", steps, {"timeout_s": 120, **parallel},
                                checkpoint={"interval": HALF, "keep_last": 10}, train={"threads": 1},
                                eval={"batches": 2, "interval": 2, "at_start": False}, model={"dropout": 0.0})
    cfg["data"] = {"seq_len": h.SEQ_T, "schedule": SCHEDULE, "sources": [
        {"name": n, "dir": str(root / "data" / n), "weight": w, "on_exhaust": how}
        for n, (_, w, how) in SOURCES.items()]}
    path = root / f"{name}_{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_here(path: Path) -> None:
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    run(load_config(str(path)))


def launch(path: Path) -> None:
    for code, _, stderr in _launch(path, 2):
        assert code == 0, stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    for i, (n, (tokens, _, _)) in enumerate(SOURCES.items()):
        write_source(root / "data" / n, tokens, seed=11 + i)
    run_here(config(root, "ref", STEPS, {}))  # uninterrupted, one process
    run_here(config(root, "one", HALF, {}))  # 1 rank, first half
    launch(config(root, "two", HALF, {"dp_shard": 2}))  # 2 ranks, first half
    shutil.copytree(root / "one", root / "one_two")
    launch(config(root, "one_two", STEPS, {"dp_shard": 2}))  # 1 -> 2
    shutil.copytree(root / "two", root / "two_one")
    run_here(config(root, "two_one", STEPS, {}))  # 2 -> 1
    return root


def _evals(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("kind") == "eval"}


def _loader_state(run_dir: Path, step: int, rank: int = 0) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:06d}" / f"rank_{rank:05d}.json").read_text())["loader"]


@pytest.mark.parametrize("name", ["one_two", "two_one"])
def test_resumed_mixture_matches_the_uninterrupted_run(runs, name):
    ref, got = h.train_losses(runs / "ref"), h.train_losses(runs / name)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert abs(got[step] - ref[step]) <= 1e-5, f"step {step}: {got[step]} vs {ref[step]}"
    ref_eval, got_eval = _evals(runs / "ref"), _evals(runs / name)
    assert sorted(got_eval) == sorted(ref_eval) == [2, 4, 6, 8]
    for step, row in ref_eval.items():
        for key in ("val_loss", *(f"val_loss/{n}" for n in SOURCES)):
            assert abs(got_eval[step][key] - row[key]) <= 1e-5, f"step {step} {key}"
    # the same windows: every source's cursor where the uninterrupted run's is, at the end
    assert _loader_state(runs / name, STEPS) == _loader_state(runs / "ref", STEPS)


def test_the_stop_source_ran_out_and_the_state_is_global(runs):
    ref = _loader_state(runs / "ref", STEPS)["sources"]
    books = ref["books"]
    assert books["cursor"] == books["num_windows"] == (170 - 1) // h.SEQ_T  # exhausted, never repeated
    assert sum(s["cursor"] for s in ref.values()) == STEPS * h.BATCH_T
    assert _loader_state(runs / "two", HALF, 0) == _loader_state(runs / "two", HALF, 1)  # every rank alike
