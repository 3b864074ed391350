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
    (none, g_none), (sel, g_sel), (full, g_full) = (forward_then_backward(m) for m in ("none", "selective", "full"))
    # full AC keeps little more than each block's input; selective keeps the matmul outputs only
    assert full < 0.5 * none and full < sel < none, (none, sel, full)
    for grads in (g_sel, g_full):  # recomputation changes memory, never the gradients
        assert set(grads) == set(g_none)
        for k in g_none:
            torch.testing.assert_close(grads[k], g_none[k], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def plain_run():
    return h.reference("tiny")


@pytest.mark.parametrize("ac,backend", [("full", None), ("selective", "aot_eager")])
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
