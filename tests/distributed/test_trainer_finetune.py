"""`lmforge finetune` sft, lora and classify (2 FSDP2 ranks) under torchrun equal 1 process:
per-step losses and dev val loss within 1e-5, dev accuracy and macro-F1 equal, one summary line per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CORPUS = ["The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
          "What is two plus two? Two plus two is four. Answer briefly and be helpful.",
          "a charming and affecting journey . a bleak and desperate film . great fun . dull and boring ."] * 20
SFT = [{"instruction": "Say hello.", "input": "", "output": "Hello there."},
       {"instruction": "What is two plus two?", "input": "", "output": "Four."},
       {"instruction": "Name an animal.", "input": "Something quick.", "output": "The quick brown fox."},
       {"instruction": "Describe the dog.", "input": "", "output": "The dog is lazy."},
       {"instruction": "How are you?", "input": "", "output": "Great fun, thank you."},
       {"instruction": "Be brief.", "input": "", "output": "Sure."}] * 4
POS = ["a charming and affecting journey", "great fun", "charming", "a great and charming film"]
NEG = ["a bleak and desperate film", "dull and boring", "boring", "a dull , desperate journey"]
STEPS = 4
# FSDP2 for every recipe (a classifier's blocks are wrapped under its backbone)
TWO_RANKS = {"sft": {"dp_shard": 2}, "lora": {"dp_shard": 2}, "classify": {"dp_shard": 2}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("ftdist")
    (d / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    train_tokenizer([str(d / "corpus.txt")], 400, d / "tok", progress=False)
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      tie_embeddings=True)
    save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))
    (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT), encoding="utf-8")
    rows = [(t, "1") for t in POS] + [(t, "0") for t in NEG]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows * 6))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return d


def _configs(d: Path, tag: str, parallel: dict[str, dict]) -> list[str]:
    base = {"model": {"from": str(d / "model"), "dropout": 0.0},
            "train": {"global_batch": 8, "micro_batch": 2, "max_steps": STEPS, "device": "cpu", "threads": 1},
            "optim": {"lr": 1e-2}, "schedule": {"name": "constant"},
            "eval": {"interval": 2, "batch_size": 2, "batches": 3}, "checkpoint": {"interval": 0},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0},
            "parallel": {"timeout_s": 120}}
    sft_data = {"train": [str(d / "sft.jsonl")], "dev_fraction": 0.25, "seq_len": 48, "batching": "pack"}
    variants = {
        "sft": {"finetune": {"mode": "sft"}, "data": sft_data},
        "lora": {"finetune": {"mode": "lora"}, "data": sft_data, "lora": {"rank": 4, "dropout": 0.0}},
        "classify": {"finetune": {"mode": "classify"}, "classify": {"pooling": "mean", "dropout": 0.0},
                     "data": {"train": [str(d / "train.tsv")], "dev": [str(d / "dev.tsv")], "text_field": "sentence",
                              "seq_len": 32, "batching": "shuffle"}},
    }
    paths = []
    for name, sections in variants.items():
        cfg = {**yaml.safe_load(yaml.safe_dump(base)), **sections, "run": {"dir": str(d / f"{name}_{tag}")}}
        cfg["parallel"].update(parallel.get(name, {}))
        path = d / f"{name}_{tag}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    return paths


def _rows(run_dir: Path, kind: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("kind") == kind}


@pytest.fixture(scope="module")
def runs(inputs):
    from lmforge import cli

    for config in _configs(inputs, "one", {}):
        assert cli.main(["finetune", "--config", config]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_finetune_worker.py"), *_configs(inputs, "two", TWO_RANKS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return inputs, proc


@pytest.mark.parametrize("mode", ["sft", "lora", "classify"])
def test_two_ranks_equal_one_process(runs, mode):
    d, proc = runs
    summaries = [line for line in proc.stdout.splitlines() if line.startswith(f"finetune {mode}:")]
    assert len(summaries) == 1, proc.stdout
    one, two = _rows(d / f"{mode}_one", "train"), _rows(d / f"{mode}_two", "train")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert abs(one[step]["loss"] - two[step]["loss"]) <= 1e-5, (mode, step, one[step]["loss"], two[step]["loss"])
        assert one[step]["tokens"] == two[step]["tokens"] and one[step]["loss_tokens"] == two[step]["loss_tokens"]
    ev1, ev2 = _rows(d / f"{mode}_one", "eval"), _rows(d / f"{mode}_two", "eval")
    assert sorted(ev1) == sorted(ev2) and len(ev1) >= 2
    for step in ev1:
        assert abs(ev1[step]["val_loss"] - ev2[step]["val_loss"]) <= 1e-5, (mode, step)
        for key in ("accuracy", "macro_f1"):
            assert ev1[step].get(key) == ev2[step].get(key), (mode, step, key)
    if mode == "classify":
        assert "accuracy" in ev1[STEPS]
    if mode != "classify":  # SFT: the loss covers the replies only, the forward pass every real token
        assert one[STEPS]["loss_tokens"] < one[STEPS]["tokens"]
