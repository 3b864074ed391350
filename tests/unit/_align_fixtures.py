"""Shared pieces of the alignment tests (test_dpo, test_reward, test_safety): a tiny model dir with its own
tokenizer, a small file of preference pairs in every accepted shape, and a DPO config builder."""

import json

import pytest
import torch

from lmforge.tasks.config import config_from_dict

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "What is two plus two? Two plus two is four. Answer briefly and be helpful.",
    "I cannot help with that request. Sure, here is how to stop a Python process.",
    "今天天气很好，我们去公园散步吧。你好，世界！机器学习很有趣。",
] * 20
PAIRS = [
    {"prompt": "Say hello.", "chosen": "Hello there.", "rejected": "No."},
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Five, probably."},
    {"prompt": [{"role": "user", "content": "Name an animal."}],
     "chosen": [{"role": "assistant", "content": "The quick brown fox."}],
     "rejected": [{"role": "assistant", "content": "A table."}]},
    {"conversations": [{"from": "human", "value": "Greet in Chinese."}], "system": "Be brief.",
     "chosen": {"from": "gpt", "value": "你好，世界！"}, "rejected": {"from": "gpt", "value": "Hello?"}},
    {"chosen": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Great, thanks."}],
     "rejected": [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Go away."}]},
    {"prompt": "How do I stop a Python process?", "chosen": "Sure, here is how to stop a Python process.",
     "rejected": "I cannot help with that request."},
] * 4


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("dpo")
    (d / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    train_tokenizer([str(d / "corpus.txt")], 400, d / "tok", progress=False)
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96,
                      tie_embeddings=True)
    return save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS), encoding="utf-8")
    return p


def dpo_cfg(model_dir, pairs_file, run_dir, **sections):
    data = {"run": {"dir": str(run_dir)}, "model": {"from": str(model_dir)}, "finetune": {"mode": "dpo"},
            "data": {"train": [str(pairs_file)], "dev_fraction": 0.25, "seq_len": 64},
            "train": {"global_batch": 4, "micro_batch": 2, "max_steps": 4, "device": "cpu", "threads": 1},
            "optim": {"lr": 1e-2}, "schedule": {"name": "constant"},
            "eval": {"interval": 2, "batch_size": 4, "at_start": True, "keep_best": False},
            "checkpoint": {"interval": 2},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]
