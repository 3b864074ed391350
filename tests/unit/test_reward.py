# ruff: noqa: F811  (pytest fixtures imported from _align_fixtures are used as arguments)
"""Reward models (finetune.mode=reward): Bradley-Terry on hand-computed numbers, a short run that learns the
preference, `lmforge eval --task pairwise`, and the round trip to Hugging Face *ForSequenceClassification with
scores equal to ours."""

import json
import math
import subprocess
import sys

import pytest
import torch
from _align_fixtures import dpo_cfg, keep_torch_threads, model_dir, pairs_file, rows  # noqa: F401

from lmforge.artifacts.reward_dir import is_reward_dir, load_reward_dir
from lmforge.models.reward import RewardModel
from lmforge.tasks.reward import bradley_terry, pairwise_metrics
from lmforge.tasks.run import run as finetune


def test_bradley_terry_and_pairwise_metrics_by_hand():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    losses = bradley_terry(c, r)
    want = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5)), math.log(2.0)]
    assert losses.tolist() == pytest.approx(want, abs=1e-6)
    m = pairwise_metrics(c, r)
    assert m["accuracy"] == pytest.approx(100 / 3)  # a tie is not a win
    assert m["margin"] == pytest.approx((1.0 - 0.5 + 0.0) / 3)
    assert m["val_loss"] == pytest.approx(sum(want) / 3, abs=1e-6)


def test_reward_score_reads_the_last_real_token(model_dir):
    from lmforge.artifacts.model_dir import load_model_dir

    rm = RewardModel(load_model_dir(model_dir)).eval()
    x = torch.randint(5, 300, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 7, dtype=torch.long)], 1)
    with torch.no_grad():
        assert torch.allclose(rm(x), rm(padded, torch.tensor([9])), atol=1e-6)
        assert not torch.allclose(rm(x[:, :8]), rm(x), atol=1e-6)


@pytest.fixture(scope="module")
def reward_run(model_dir, pairs_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("reward") / "run"
    res = finetune(dpo_cfg(model_dir, pairs_file, run, finetune={"mode": "reward"}, train={"max_steps": 10},
                           eval={"interval": 5, "at_start": True}, optim={"lr": 5e-3}))
    return res, run


def test_reward_run_learns_the_preference_and_writes_a_reward_dir(reward_run):
    res, run = reward_run
    evals = rows(run, "eval")
    assert all({"val_loss", "accuracy", "margin"} <= set(e) for e in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["margin"] > evals[0]["margin"]
    assert evals[-1]["accuracy"] >= 50.0
    assert is_reward_dir(res.model_dir)
    model = load_reward_dir(res.model_dir)
    assert model.score.weight.shape == (1, model.cfg.dim) and model.score.bias is None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_eval_pairwise_cli_reports_accuracy_and_margin(reward_run, pairs_file, tmp_path):
    res, _ = reward_run
    out = tmp_path / "pw.json"
    p = _cli("eval", "--model", res.model_dir, "--task", "pairwise", "--data", str(pairs_file), "--json",
             "--out", str(out))
    assert p.returncode == 0, p.stderr
    payload = json.loads(p.stdout)
    m = payload["metrics"]
    assert m["n"] == 24 and 0.0 <= m["accuracy"] <= 100.0
    full = json.loads(out.read_text())
    margins = [x["chosen_score"] - x["rejected_score"] for x in full["predictions"]]
    assert m["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-9)
    assert m["accuracy"] == pytest.approx(100.0 * sum(d > 0 for d in margins) / len(margins))
    bad = _cli("eval", "--model", str(tmp_path), "--task", "pairwise", "--data", str(pairs_file))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error:")


def test_export_to_hf_sequence_classification_gives_equal_scores(reward_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    res, _ = reward_run
    p = _cli("export", "--model", res.model_dir, "--format", "hf", "--out", str(tmp_path / "hf"), "--json")
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ours = load_reward_dir(res.model_dir)
    g = torch.Generator().manual_seed(0)
    pad = cfg["pad_token_id"]
    seqs = [torch.randint(5, 300, (n,), generator=g) for n in (7, 12, 4)]
    seqs = [s[s != pad] for s in seqs]
    tokens = torch.full((3, 12), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        want = ours(tokens, lengths)
        got = hf(input_ids=tokens, attention_mask=(torch.arange(12)[None] < lengths[:, None]).long()).logits
        single = hf(input_ids=seqs[0][None]).logits
    assert got.shape == (3, 1)
    assert torch.allclose(got[:, 0], want, atol=1e-5), (got[:, 0], want)
    assert torch.allclose(single[0, 0], want[0], atol=1e-5)


def test_lora_reward_model_adapters_equal_the_merged_model(model_dir, pairs_file, tmp_path):
    from lmforge.artifacts.adapter_dir import load_adapter

    res = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "lora", finetune={"mode": "reward"},
                           classify={"method": "lora"}, lora={"rank": 4, "alpha": 8, "targets": ["all-linear"]},
                           train={"max_steps": 4}, eval={"interval": 4, "at_start": False}))
    assert res.trainable_params < res.total_params / 4
    merged = load_reward_dir(res.model_dir)
    unmerged, meta = load_adapter(tmp_path / "lora" / "adapter")
    assert meta["task"] == "reward" and isinstance(unmerged, RewardModel)
    x = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(unmerged(x), merged(x), atol=1e-5)
