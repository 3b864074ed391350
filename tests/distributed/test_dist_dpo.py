"""DPO on 2 gloo ranks through the real recipe and Trainer equals the one-process run: the same train losses,
held-out DPO metrics and final weights — with the frozen-copy reference and with reference log-probs
precomputed by both ranks (each computes its share, then they are summed)."""

from __future__ import annotations

import json
from pathlib import Path

import _dist_harness as h
import pytest
import torch

pytestmark = pytest.mark.distributed

PAIRS = [
    {"prompt": "Say hello.", "chosen": "Hello there.", "rejected": "No."},
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five, probably."},
    {"prompt": "Name an animal.", "chosen": "The quick brown fox.", "rejected": "A table."},
    {"prompt": "How are you?", "chosen": "Great, thanks.", "rejected": "Go away."},
    {"prompt": "How do I stop a Python process?", "chosen": "Use kill with its process id.",
     "rejected": "I cannot help with that."},
] * 4


def _config(root: Path, run: str, **dpo) -> dict:
    return {"run": {"dir": str(root / run)}, "model": {"from": str(root / "model")}, "finetune": {"mode": "dpo"},
            "dpo": dpo, "data": {"train": [str(root / "pairs.jsonl")], "dev_fraction": 0.2, "seq_len": 48},
            "train": {"global_batch": 4, "micro_batch": 2, "max_steps": 4, "device": "cpu", "threads": 1},
            "optim": {"lr": 1e-2}, "schedule": {"name": "constant"},
            "eval": {"interval": 2, "batch_size": 4, "keep_best": False}, "checkpoint": {"interval": 0},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0}}


def run_dpo(info, configs: list[dict]) -> None:
    """Spawned rank entry: run each config with the real recipe."""
    from lmforge.tasks.config import config_from_dict
    from lmforge.tasks.run import run as finetune

    for c in configs:
        finetune(config_from_dict(c))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("dpo_dist")
    text = [f"{p['prompt']} {p['chosen']} {p['rejected']}" for p in PAIRS] * 10
    (d / "corpus.txt").write_text("\n".join(text), encoding="utf-8")
    train_tokenizer([str(d / "corpus.txt")], 300, d / "tok", progress=False)
    cfg = ModelConfig(vocab_size=384, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                      tie_embeddings=True)
    save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    run_dpo(None, [_config(d, "one_copy"), _config(d, "one_pre", precompute_ref=True)])
    h.spawn(2, "test_dist_dpo:run_dpo", configs=[_config(d, "two_copy"), _config(d, "two_pre", precompute_ref=True)])
    return d


def _rows(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.parametrize("ref", ["copy", "pre"])
def test_two_ranks_match_one_process(root, ref):
    from lmforge.artifacts.model_dir import load_weights

    one, two = root / f"one_{ref}", root / f"two_{ref}"
    assert list(two.glob("checkpoints/step_000004/rank_00001.json"))  # really ran on two ranks
    la, lb = [r["loss"] for r in _rows(one, "train")], [r["loss"] for r in _rows(two, "train")]
    assert len(la) == len(lb) == 4 and la == pytest.approx(lb, abs=1e-5)
    assert la[0] == pytest.approx(0.6931472, abs=1e-5)  # policy == reference at step 0 on both
    for ea, eb in zip(_rows(one, "eval"), _rows(two, "eval")):
        for k in ("val_loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert ea[k] == pytest.approx(eb[k], abs=1e-4), k
    wa, wb = load_weights(one / "model"), load_weights(two / "model")
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    if ref == "pre":
        from safetensors.torch import load_file

        sa, sb = load_file(str(one / "reference_logps.safetensors")), load_file(str(two / "reference_logps.safetensors"))
        assert all(torch.allclose(sa[k].double(), sb[k].double(), atol=1e-5) for k in sa if not k.endswith("done"))
        assert all(bool(sb[k].all()) for k in sb if k.endswith("done"))
