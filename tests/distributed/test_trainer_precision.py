"""The pretraining recipe on 2 FSDP2 ranks equals 1 process with document masks (fp32, 1e-5) and with bf16
autocast (1e-4: bf16 rounds the compute copy of the weights, so a gradient sum taken in another order
could flip a rounding; measured on this CPU over 4 steps: bit-equal for bf16, 2.4e-7 for doc masks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import _dist_harness as h
import numpy as np
import pytest
import yaml

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
BF16_TOL = 1e-4  # nats/token, per-step train loss and val loss


def _token_dir_with_documents(d: Path) -> Path:
    """Like `_dist_harness.write_token_dir`, with an EOS (id 0) every 5-11 tokens: many short documents."""
    from lmforge.data.shards import FORMAT

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    index = {"format": FORMAT, "version": 1, "tokenizer_hash": "sha256:test", "vocab_size": h.VOCAB_T,
             "dtype": "uint16", "eos_id": 0, "splits": {}}
    for split, n in (("train", 6000), ("val", 600)):
        tokens = rng.integers(1, h.VOCAB_T, n)
        ends = np.cumsum(rng.integers(5, 12, n))
        tokens[ends[ends < n]] = 0
        blob = tokens.astype("uint16").tobytes()
        (d / f"{split}_00000.bin").write_bytes(blob)
        docs = int((tokens == 0).sum())
        index["splits"][split] = {"tokens": n, "documents": docs, "shards": [
            {"file": f"{split}_00000.bin", "tokens": n, "documents": docs, "sha256": hashlib.sha256(blob).hexdigest()}]}
    (d / "index.json").write_text(json.dumps(index))
    return d


def _config(tmp_path: Path, name: str, data_dir: Path, parallel: dict, **sections) -> str:
    cfg = h.trainer_config_dict(tmp_path / name, data_dir, STEPS, {"timeout_s": 120, **parallel},
                                eval={"batches": 2, "interval": 2, "at_start": True},
                                checkpoint={"interval": 0}, **sections)
    cfg["train"].update(threads=1)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _rows(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r.get("kind") == kind}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lmforge.tasks.run import run
    from lmforge.train.config import load_config

    root = tmp_path_factory.mktemp("precision")
    data = _token_dir_with_documents(root / "data")
    variants = {"doc": {"data": {"doc_mask": True}}, "bf16": {"train": {"precision": "bf16"}}, "plain": {}}
    for name, sections in variants.items():
        run(load_config(_config(root, f"{name}_one", data, {}, **sections)))
    h.spawn(2, "_trainer_jobs:pretrain_configs", configs=[
        _config(root, f"{name}_two", data, {"dp_shard": 2}, **variants[name]) for name in ("doc", "bf16")])
    return root


@pytest.mark.parametrize("name,tol", [("doc", 1e-5), ("bf16", BF16_TOL)])
def test_two_ranks_equal_one_process(runs, name, tol):
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        one, two = _rows(runs / f"{name}_one", kind, key), _rows(runs / f"{name}_two", kind, key)
        assert sorted(one) == sorted(two) and one, (kind, one, two)
        for step in one:
            assert abs(one[step] - two[step]) <= tol, (name, kind, step, one[step], two[step])


def test_document_masks_and_bf16_change_the_losses(runs):
    """Not vacuous: the masks and the autocast do act (vs the plain fp32 run on the same data)."""
    plain = _rows(runs / "plain_one", "train", "loss")
    for name in ("doc", "bf16"):
        other = _rows(runs / f"{name}_one", "train", "loss")
        assert max(abs(other[s] - plain[s]) for s in plain) > 1e-4, name
