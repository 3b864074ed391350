"""Exact resume, tested by really killing the training process.

* SIGKILL at a random step, resume: per-step losses (and val losses, and the final weights) are
  bit-identical to an uninterrupted run (CPU, fp32, dropout on so RNG state matters).
* SIGKILL inside a checkpoint save, at each stage of it (DCP shards written / meta.json written /
  directory renamed / LATEST about to be replaced): LATEST always names a complete checkpoint that
  loads, and the resumed run still matches the uninterrupted one bit for bit.
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
STEPS = 24


def cli(shards, run_dir):
    return ["-m", "lmforge", "pretrain", "--config", str(REPO / "lmforge/recipes/pretrain/tiny.yaml"),
            f"data.dir={shards}", f"run.dir={run_dir}", "data.seq_len=64", "train.global_batch=8",
            "train.micro_batch=4", f"train.max_steps={STEPS}", "train.threads=1", "model.dropout=0.1",
            "schedule.warmup_steps=4", "checkpoint.interval=3", "checkpoint.keep_last=2", "log.interval=1",
            "eval.interval=8", "eval.batches=2", "log.peak_tflops=1", "log.progress=false"]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run_cli(args, check=True):
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def losses(run_dir, kind="train", key="loss"):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    src = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"  # a vendored slice
    d = tmp_path_factory.mktemp("data")
    train_tokenizer([str(src)], 512, d / "tok", txt_mode="blank", progress=False)
    prepare([str(src)], d / "tok", d / "shards", val_fraction=0.05, txt_mode="blank", progress=False)
    return d / "shards"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_cli(cli(shards, run_dir))
    return run_dir


def assert_same_as_reference(run_dir, reference):
    got, ref = losses(run_dir), losses(reference)
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    assert got == ref  # bit-identical floats, step by step
    assert losses(run_dir, "eval", "val_loss") == losses(reference, "eval", "val_loss")
    from safetensors.torch import load_file

    a, b = load_file(reference / "model" / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def assert_latest_loads(run_dir):
    """LATEST names a complete checkpoint, and it loads into a fresh model + optimizer."""
    from lmforge.models.transformer import build_model
    from lmforge.train.checkpoint import CheckpointManager, is_complete, read_meta
    from lmforge.train.config import load_config
    from lmforge.train.optim import build_optimizer

    ckpt_dir = Path(run_dir) / "checkpoints"
    name = (ckpt_dir / "LATEST").read_text().strip()
    assert is_complete(ckpt_dir / name), name
    meta = read_meta(ckpt_dir / name)
    cfg = load_config(None, base=meta["config"])
    model = build_model(cfg.model_config(), init=False)
    CheckpointManager(ckpt_dir).load(ckpt_dir / name, model, build_optimizer(model, cfg.optim))
    return int(meta["step"])


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(shards, reference, tmp_path):
    kill_at = random.Random(time.time_ns()).randint(4, STEPS - 4)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *cli(shards, run_dir)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(s >= kill_at for s, _ in losses(run_dir)):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"run ended before step {kill_at}: {proc.stderr.read()[-1000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_after = max(s for s, _ in losses(run_dir))
    assert killed_after < STEPS, f"killed at step {kill_at} but the run had finished"
    ckpt_step = assert_latest_loads(run_dir)
    assert ckpt_step <= killed_after
    run_cli(cli(shards, run_dir))
    assert_same_as_reference(run_dir, reference)


KILLER = r"""
import os, signal, sys
from pathlib import Path
stage, step = sys.argv[1], int(sys.argv[2])
tmp_name, final_name = f".tmp_step_{step:06d}", f"step_{step:06d}"
def die():
    os.kill(os.getpid(), signal.SIGKILL)
import torch.distributed.checkpoint as dcp
real_save, real_replace = dcp.save, os.replace
def save(state, checkpoint_id=None, **kw):
    out = real_save(state, checkpoint_id=checkpoint_id, **kw)
    if stage == "shards" and Path(checkpoint_id).name == tmp_name:
        die()  # DCP shards written, no meta.json, no rename
    return out
def replace(src, dst, *a, **kw):
    src, dst = Path(src), Path(dst)
    if stage == "rename" and src.name == tmp_name:
        die()  # complete temp dir (meta.json inside), not yet renamed
    if stage == "latest" and dst.name == "LATEST" and src.read_text().strip() == final_name:
        die()  # renamed into place, LATEST not yet updated
    real_replace(src, dst, *a, **kw)
    if stage == "meta" and dst.name == "meta.json" and dst.parent.name == tmp_name:
        die()  # meta.json written inside the temp dir
dcp.save, os.replace = save, replace
from lmforge.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_saves_never_breaks_latest(shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = cli(shards, run_dir)[2:]  # without "-m lmforge"
    for stage, step, expect_latest in (("shards", 6, 3), ("meta", 6, 3), ("rename", 6, 3), ("latest", 9, 6)):
        p = run_cli(["-c", KILLER, stage, str(step), *args], check=False)
        assert p.returncode == -signal.SIGKILL, (stage, p.returncode, p.stderr[-1500:])
        assert assert_latest_loads(run_dir) == expect_latest, stage
        if stage == "latest":  # the unreferenced but complete step_000009 is a valid fallback, never a partial one
            assert (run_dir / "checkpoints" / "step_000009" / "meta.json").is_file()
    run_cli(cli(shards, run_dir))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp_")]
    assert_same_as_reference(run_dir, reference)
