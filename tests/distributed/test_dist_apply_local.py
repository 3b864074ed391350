"""Activation checkpointing and compile in one process: exact same training, stable names, and AC
really recomputes (counted at the aten level during backward)."""

from __future__ import annotations

import subprocess
import sys

import _dist_harness as h
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.config import ConfigError
from lmforge.distributed.apply import parallelize
from lmforge.distributed.config import ParallelConfig
from lmforge.models.transformer import build_model


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_ops(ac: str) -> dict[str, int]:
    model = build_model(h.model_config("tiny"), seed=0)
    parallelize(model, ParallelConfig(activation_checkpoint=ac))
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_activation_checkpointing_recomputes_what_it_promises():
    none, full = backward_ops("none"), backward_ops("full")
    sel, mms, every2 = backward_ops("selective"), backward_ops("matmuls"), backward_ops("layer-2")
    layers, linears = 2, 7  # tiny: wq wk wv wo w1 w2 w3 per block
    mm = lambda c: c.get("mm", 0) + c.get("addmm", 0)
    # no AC: backward runs no forward op; full AC re-runs every block's matmuls and activations
    assert none.get("silu", 0) == 0
    # (non-reentrant checkpoint stops recomputing once backward has what it needs: the block's last
    # matmul, w2, feeds only the residual add, so it is not re-run)
    assert full.get("silu", 0) == layers and mm(full) == mm(none) + layers * (linears - 1)
    # matmuls: every matmul output is kept (no matmul recomputed), pointwise work is redone
    assert mms.get("silu", 0) == layers and mm(mms) == mm(none)
    # selective (torchtitan's op SAC): the 2nd, 4th and 6th mm of each block (wk, wo, w3) are recomputed
    assert sel.get("silu", 0) == layers and mm(sel) == mm(none) + layers * 3
    sdpa = [k for k in full if k.startswith("_scaled_dot_product") and not k.endswith("backward")]
    assert sdpa and all(c.get(k, 0) == 0 for k in sdpa for c in (sel, mms))  # attention is saved, not recomputed
    # layer-2: only the second block is checkpointed (full)
    assert every2.get("silu", 0) == 1 and mm(every2) == mm(none) + (linears - 1)


@pytest.fixture(scope="module")
def plain_run():
    return h.reference("tiny")


@pytest.mark.parametrize("ac,backend", [("full", None), ("selective", "aot_eager"), ("selective", None),
                                        ("matmuls", None), ("layer-2", None)])
def test_ac_and_compile_train_exactly_like_the_plain_model(plain_run, ac, backend):
    import torch._dynamo

    torch._dynamo.reset()
    ref_metrics, ref_state = plain_run
    metrics, state = h.reference("tiny", ac=ac, compile_backend=backend)
    if backend:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    for a, b in zip(metrics, ref_metrics):
        assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert set(state) == set(ref_state)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=0, atol=2e-5)


def test_names_stay_the_checkpoint_keys():
    plain = build_model(h.model_config("tiny"), seed=0)
    model = build_model(h.model_config("tiny"), seed=0)
    parallelize(model, ParallelConfig(activation_checkpoint="full", compile=True, compile_backend="aot_eager"))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert model._lmforge_parallel == {"wrapper": "none", "tp": 1, "dp": 1, "ac": "full", "compile": True,
                                       "param_dtype": "float32"}


def test_single_process_cannot_do_tensor_parallel():
    model = build_model(h.model_config("tiny"), seed=0)
    with pytest.raises(ConfigError, match="parallel.dp_replicate=1 x parallel.tp=2 = 2 does not divide the world "
                                          "size 1"):
        parallelize(model, ParallelConfig(tp=2))


def test_cli_reports_parallel_errors_in_one_line(tmp_path):
    data = h.write_token_dir(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(h.trainer_config_dict(tmp_path / "run", data, 2)))
    for override, msg in [("parallel.tp=0", "error: parallel.tp=0 must be >= 1"),
                          ("parallel.tp=2", "error: parallel.dp_replicate=1 x parallel.tp=2 = 2 does not divide"),
                          ("parallel.activation_checkpoint=some", "error: parallel.activation_checkpoint='some'")]:
        out = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(cfg), override],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith(msg), out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_pretrain_cli_trains_the_same_under_every_ac_policy(tmp_path):
    """`lmforge pretrain` with each AC name the config accepts: the real Trainer, same losses as no AC."""
    import json

    import yaml

    data = h.write_token_dir(tmp_path / "data")
    losses = {}
    for ac in ("none", "selective", "matmuls", "layer-2"):
        cfg = tmp_path / f"{ac}.yaml"
        cfg.write_text(yaml.safe_dump(h.trainer_config_dict(tmp_path / ac, data, 3,
                                                            parallel={"activation_checkpoint": ac})))
        out = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(cfg)],
                             capture_output=True, text=True, check=False, timeout=600)
        assert out.returncode == 0, out.stderr
        rows = [json.loads(line) for line in (tmp_path / ac / "metrics.jsonl").read_text().splitlines()]
        losses[ac] = [r["loss"] for r in rows if "loss" in r]
        assert len(losses[ac]) == 3
    for ac in ("selective", "matmuls", "layer-2"):
        assert losses[ac] == pytest.approx(losses["none"], abs=1e-5), (ac, losses)
