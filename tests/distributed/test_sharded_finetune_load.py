"""`lmforge finetune` (full SFT) under torchrun with FSDP2: the base model dir is read into the already
sharded model (each rank its slices) and training equals the 1-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
          "What is two plus two? Two plus two is four. Answer briefly and be helpful."] * 20
SFT = [{"instruction": "Say hello.", "input": "", "output": "Hello there."},
       {"instruction": "What is two plus two?", "input": "", "output": "Four."},
       {"instruction": "Name an animal.", "input": "Something quick.", "output": "The quick brown fox."},
       {"instruction": "Describe the dog.", "input": "", "output": "The dog is lazy."}] * 4


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def _run(cmd, log: Path) -> None:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_full_sft_two_ranks_reads_shards_and_equals_one_process(tmp_path):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    train_tokenizer([str(tmp_path / "corpus.txt")], 300, tmp_path / "tok", progress=False)
    mcfg = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    base = save_model_dir(build_model(mcfg, seed=0), tmp_path / "model", tokenizer_dir=str(tmp_path / "tok"),
                          max_shard_bytes=30_000)  # several safetensors files + an index
    sft = tmp_path / "train.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in SFT))
    cfg = {"run": {"dir": str(tmp_path / "unused")}, "model": {"from": str(base)},
           "data": {"train": [str(sft)], "dev_fraction": 0.25, "seq_len": 48, "batching": "pack"},
           "train": {"global_batch": 4, "micro_batch": 2, "max_steps": 3, "device": "cpu", "threads": 1},
           "optim": {"lr": 1e-2}, "schedule": {"name": "constant"}, "eval": {"interval": 0, "batch_size": 2},
           "checkpoint": {"interval": 0}, "log": {"interval": 1, "progress": False, "peak_tflops": 1.0}}
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))
    ft = ["-m", "lmforge", "finetune", "--config", str(config)]
    _run([sys.executable, *ft, f"run.dir={tmp_path / 'one'}"], tmp_path / "one.log")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *ft,
          f"run.dir={tmp_path / 'two'}", "parallel.dp_shard=2"], tmp_path / "two.log")
    assert f"model: sharded load from {base} on the meta device, materialized each rank its shards" in \
        (tmp_path / "two.log").read_text()
    ref, got = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5, (step, got[step], ref[step])
