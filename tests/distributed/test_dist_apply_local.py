"""Activation checkpointing and compile in one process: exact same training, stable names, and AC
really frees activations (the forward's intermediate tensors still alive when backward starts) while the
gradients stay those of the plain model."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import _dist_harness as h
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.config import ConfigError
from lmforge.distributed.apply import parallelize
from lmforge.distributed.config import ParallelConfig
from lmforge.models.transformer import build_model


class LiveOutputs(TorchDispatchMode):
    """Weak references to every tensor an aten op returns while active (the forward's activations)."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out

    def live_bytes(self) -> int:
        """Bytes of the distinct storages of the op outputs that are still alive."""
        gc.collect()
        storages = {}
        for r in self.refs:
            t = r()
            if t is not None:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def forward_then_backward(ac: str) -> tuple[int, dict[str, torch.Tensor]]:
    """(activation bytes alive between forward and backward, gradients) for one step of the tiny model."""
    model = build_model(h.model_config("tiny"), seed=0)
    parallelize(model, ParallelConfig(activation_checkpoint=ac))
    tokens = torch.randint(0, 512, (4, 129), generator=torch.Generator().manual_seed(0))
    with LiveOutputs() as live:
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    held = live.live_bytes()
    loss.backward()
    return held, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_frees_activations_and_keeps_gradients():
    runs = {m: forward_then_backward(m) for m in ("none", "matmuls", "selective", "layer-2", "full")}
    held = {m: r[0] for m, r in runs.items()}
    # full AC keeps little more than each block's input; selective (torchtitan's op policy: every second mm
    # recomputed) keeps less than matmuls (every matmul output kept); layer-2 checkpoints one of two blocks
    assert held["full"] < 0.5 * held["none"], held
    assert held["full"] < held["selective"] < held["matmuls"] < held["none"], held
    assert held["full"] < held["layer-2"] < held["none"], held
    g_none = runs["none"][1]
    for mode in ("matmuls", "selective", "layer-2", "full"):  # recomputation changes memory, never gradients
        grads = runs[mode][1]
        assert set(grads) == set(g_none)
        for k in g_none:
            torch.testing.assert_close(grads[k], g_none[k], rtol=0, atol=1e-6, msg=lambda m, k=k, mode=mode:
                                       f"{mode} {k}: {m}")


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
    assert h.data_parallel_wrapper(model) == "none"
    assert [(b._lmforge_ac, b._lmforge_compiled) for b in model.layers] == [("full", "aot_eager")] * len(model.layers)


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
