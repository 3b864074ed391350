"""Pretraining hooks of the HF issue, end to end: BERT masked-LM from scratch (`train.objective=mlm`) →
export → `BertForMaskedLM`, and `model.init_embeddings_from` word vectors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"  # a vendored slice


def lmforge(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("data")
    train_tokenizer([str(SRC)], 512, d / "tok", txt_mode="blank", progress=False)
    prepare([str(SRC)], d / "tok", d / "shards", val_fraction=0.05, txt_mode="blank", progress=False)
    return d / "shards"


def _args(shards, run_dir, steps):
    return ["pretrain", "--config", REPO / "lmforge/recipes/pretrain/tiny.yaml", f"data.dir={shards}", f"run.dir={run_dir}",
            "data.seq_len=64", "train.global_batch=16", "train.micro_batch=16", f"train.max_steps={steps}",
            "train.threads=1", "optim.lr=5e-3", f"schedule.warmup_steps={min(5, steps - 1)}", f"eval.interval={steps}",
            "eval.batches=4", f"checkpoint.interval={steps}", "log.interval=10"]


@pytest.mark.slow
def test_bert_mlm_pretraining_from_scratch_exports_to_transformers(shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from lmforge.artifacts.heads_dir import load_heads
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.models.heads import mlm_logits

    run = tmp_path / "bert"
    bert = ["model.preset=bert-base", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=128",
            "model.max_seq_len=64", "model.dropout=0.0", "train.objective=mlm"]
    result = json.loads(lmforge(*_args(shards, run, 60), *bert, "--json").stdout)
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in evals if r["kind"] == "eval"]
    assert evals[0] > 6.0 and evals[-1] < evals[0] - 0.6, evals  # ln(513) ≈ 6.24 at step 0
    assert result["step"] == 60
    model_dir = run / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["lmforge"]["heads"] == ["mlm"] and cfg["model"]["vocab_size"] == 513  # one extra id: the mask token
    lm = load_model_dir(model_dir).eval()
    head = load_heads(model_dir, lm.cfg)["mlm"]
    lmforge("export", "--model", model_dir, "--out", tmp_path / "hf")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "BertForMaskedLM"
    x = torch.randint(7, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, mlm_logits(lm, head, x), atol=1e-5, rtol=0)

    p = lmforge(*_args(shards, tmp_path / "bad", 5), "model.preset=tiny", "train.objective=mlm", check=False)
    assert p.returncode == 2 and "train.objective=mlm needs an encoder" in p.stderr


def test_init_embeddings_from_word_vectors(shards, tmp_path):
    from lmforge.models.embedding_init import token_surfaces
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(shards.parent / "tok")
    words = sorted({s.lower() for s in token_surfaces(tok) if s and s.isalpha() and len(s) > 2})[:40]
    g = torch.Generator().manual_seed(0)
    vec = tmp_path / "vectors.txt"
    vec.write_text("".join(f"{w} " + " ".join(f"{x:.5f}" for x in torch.randn(50, generator=g).tolist()) + "\n"
                           for w in words))
    run = tmp_path / "w2v"
    p = lmforge(*_args(shards, run, 2), f"model.init_embeddings_from={vec}")
    line = next(x for x in p.stderr.splitlines() if x.startswith("embeddings from vectors.txt"))
    assert "50→128 dims (random)" in line  # narrower vectors: an isometry into the model width
    n = int(line.split(": ")[1].split("/")[0])
    assert n >= len(words)  # every listed word matched (plus capitalised / space-prefixed twins)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["init_embeddings_from"] == str(vec)
    report = json.loads((run / "model" / "config.json").read_text())["init_embeddings_from"]
    assert report["matched"] == n and report["vector_dim"] == 50

    p = lmforge(*_args(shards, tmp_path / "missing", 2), f"model.init_embeddings_from={tmp_path}/nope.txt",
                check=False)
    assert p.returncode == 2 and "model.init_embeddings_from=" in p.stderr and "does not exist" in p.stderr
