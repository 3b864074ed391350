"""Asynchronous checkpoints (`checkpoint.async`) under SIGKILL at random moments.

A tiny pretraining run saves every 2 steps in the background, its shard writing slowed (a slower disk)
so that a save is almost always in flight. Over many trials the process is killed at a random moment;
after each kill LATEST names a complete checkpoint that verifies (every file's sha256) and loads, every
step dir that exists verifies, and the next start resumes from it. The run finally finishes and is
bit-identical (losses step by step, val losses, final weights) to an uninterrupted synchronous run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 36
TRIALS = 12


def cli(shards, run_dir, async_save: bool):
    return ["pretrain", "--config", str(REPO / "lmforge/recipes/pretrain/tiny.yaml"),
            f"data.dir={shards}", f"run.dir={run_dir}", "data.seq_len=64", "train.global_batch=8",
            "train.micro_batch=4", f"train.max_steps={STEPS}", "train.threads=1", "model.dropout=0.1",
            "schedule.warmup_steps=4", "checkpoint.interval=2", "checkpoint.keep_last=2", "log.interval=1",
            "eval.interval=10", "eval.batches=2", "log.peak_tflops=1", "log.progress=false",
            f"checkpoint.async={'true' if async_save else 'false'}"]


# The CLI with the background shard writing slowed by DELAY seconds per save (a slow disk).
SLOW = r"""
import sys, time
from lmforge.train import checkpoint as ck
real = ck.HashingWriter.write_data
def write_data(self, plan, planner):
    time.sleep(float(sys.argv[1]))
    return real(self, plan, planner)
ck.HashingWriter.write_data = write_data
from lmforge.cli import main
sys.exit(main(sys.argv[2:]))
"""


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_to_end(args):
    p = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]


def rows(run_dir):
    f = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def losses(run_dir, kind="train", key="loss"):
    return [(r["step"], r[key]) for r in rows(run_dir) if r["kind"] == kind]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    src = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"
    d = tmp_path_factory.mktemp("data")
    train_tokenizer([str(src)], 512, d / "tok", txt_mode="blank", progress=False)
    prepare([str(src)], d / "tok", d / "shards", val_fraction=0.05, txt_mode="blank", progress=False)
    return d / "shards"


def check_after_kill(run_dir) -> int:
    """Every step dir verifies (none is half-written); LATEST loads. Its step (0: none was written yet)."""
    from lmforge.models.transformer import build_model
    from lmforge.train.checkpoint import CheckpointManager, read_meta, verify_checkpoint
    from lmforge.train.config import load_config
    from lmforge.train.optim import build_optimizer

    ckpt_dir = Path(run_dir) / "checkpoints"
    for p in ckpt_dir.glob("step_*"):
        assert verify_checkpoint(p) is None, (p, verify_checkpoint(p))
    if not (ckpt_dir / "LATEST").is_file():  # killed before the first save completed: a fresh start
        return 0
    name = (ckpt_dir / "LATEST").read_text().strip()
    meta = read_meta(ckpt_dir / name)
    cfg = load_config(None, base=meta["config"])
    assert cfg.checkpoint.async_ is True
    model = build_model(cfg.model_config(), init=False)
    CheckpointManager(ckpt_dir).load(ckpt_dir / name, model, build_optimizer(model, cfg.optim))
    return int(meta["step"])


@pytest.mark.slow
def test_sigkill_at_random_moments_of_async_saves(shards, tmp_path):
    ref = tmp_path / "ref"
    run_to_end(cli(shards, ref, False))
    run_dir = tmp_path / "run"
    rng = random.Random(time.time_ns())
    mid_save = resumed = 0
    seen_latest = []
    for trial in range(TRIALS):
        start = max((s for s, _ in losses(run_dir)), default=0)
        if start >= STEPS - 2:
            break
        proc = subprocess.Popen([sys.executable, "-c", SLOW, "0.25", *cli(shards, run_dir, True)], cwd=REPO,
                                env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = start + rng.randint(1, 4)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            done = [s for s, _ in losses(run_dir)]
            if done and max(done) >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere in the save in flight (or the steps around it)
        assert proc.poll() is None, f"trial {trial}: the run ended early: {proc.stderr.read()[-1500:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        ckpt_dir = run_dir / "checkpoints"
        mid_save += ckpt_dir.is_dir() and any(p.name.startswith(".tmp_step_") for p in ckpt_dir.iterdir())
        latest_step = check_after_kill(run_dir)
        resumed += any(r.get("event") == "resume" for r in rows(run_dir))
        seen_latest.append(latest_step)
    assert len(seen_latest) >= 8, seen_latest
    assert resumed >= sum(1 for s in seen_latest[:-1] if s)  # every start after a checkpoint resumed
    assert mid_save >= len(seen_latest) // 2, f"only {mid_save} of {len(seen_latest)} kills hit a save in flight"
    assert seen_latest == sorted(seen_latest) and seen_latest[-1] > seen_latest[0], seen_latest
    run_to_end(cli(shards, run_dir, True))
    got = losses(run_dir)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == losses(ref)  # bit-identical, step by step
    assert losses(run_dir, "eval", "val_loss") == losses(ref, "eval", "val_loss")
    from safetensors.torch import load_file

    a, b = load_file(ref / "model" / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{STEPS:06d}"
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    print(f"{len(seen_latest)} kills, {mid_save} during a save in flight, LATEST after each: {seen_latest}")
