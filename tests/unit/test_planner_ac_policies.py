"""The activation-checkpointing policies the trainer applies (`lmforge.distributed.apply.apply_ac`) and the
planner models, one vocabulary: `selective` (torchtitan's op-level SAC: every second `mm` of a block
recomputed), `matmuls` (every matmul kept), `layer-N` (full AC on every N-th block), measured on the real
lmforge Transformer on CPU: the storages still alive after the forward pass, and the gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmforge.config import ConfigError
from lmforge.distributed.apply import apply_ac
from lmforge.distributed.config import parse_ac_policy
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.planner.activations import Frozen, estimate_activations, parse_ac

B, T = 2, 64
SMALL = {"n_layers": 4, "dim": 96, "n_heads": 6, "n_kv_heads": 2, "ffn_hidden": 200, "vocab_size": 300,
         "max_seq_len": 128, "tie_embeddings": False}
POLICIES = ("none", "matmuls", "selective", "layer-2", "full")


class _Live(TorchDispatchMode):
    def __init__(self, exclude):
        super().__init__()
        self.refs, self.exclude = {}, exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.refs[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        return out

    def live(self) -> int:
        return sum(n for k, (ref, n) in self.refs.items() if k not in self.exclude and not ref.expired())


def _batch(cfg):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.vocab_size, (B, T), generator=g),
            torch.randint(0, cfg.vocab_size, (B, T), generator=g))


def _run(cfg, ac: str, steps: int = 1, lora: LoraConfig | None = None):
    """(bytes retained after the first forward, {name: grad} after `steps` forward/backward passes)."""
    model = build_model(cfg, seed=0)
    model.train()
    if lora is not None:
        apply_lora(model, lora)
    apply_ac(model, ac)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    tokens, targets = _batch(cfg)
    retained = None
    for _ in range(steps):
        tracker = _Live(exclude)
        with tracker:
            loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten())
            if retained is None:
                retained = tracker.live() - loss.untyped_storage().nbytes()
        loss.backward()
    return retained, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("over", [{"activation": "swiglu"}, {"activation": "gelu"}, {"qkv_bias": True}],
                         ids=["swiglu", "gelu", "qkv-bias"])
def test_selective_is_torchtitans_op_sac_and_the_planner_is_exact(over):
    cfg = get_preset("tiny", **{**SMALL, **over})
    measured = {ac: _run(cfg, ac)[0] for ac in ("matmuls", "selective")}
    est = {ac: estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac=ac).saved_bytes for ac in measured}
    for ac, got in measured.items():
        assert abs(est[ac] - got) / got < 0.03, (ac, est[ac], got)
    # every second mm of each block is recomputed: selective frees more than matmuls after forward
    assert measured["selective"] < measured["matmuls"]
    assert est["selective"] < est["matmuls"]


def test_layer_2_checkpoints_every_second_block():
    cfg = get_preset("tiny", **SMALL)
    model = build_model(cfg, seed=0)
    apply_ac(model, "layer-2")
    assert [getattr(b, "_lmforge_ac", None) for b in model.layers] == [None, "layer-2", None, "layer-2"]
    measured = _run(cfg, "layer-2")[0]
    est = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac="layer-2").saved_bytes
    assert abs(est - measured) / measured < 0.03, (est, measured)
    none, full = _run(cfg, "none")[0], _run(cfg, "full")[0]
    assert full < measured < none


@pytest.mark.parametrize("targets, dropout, over", [(["wq", "wv"], 0.0, {}), (["all-linear"], 0.1, {}),
                                                    (["wq", "wv"], 0.0, {"qkv_bias": True})],
                         ids=["qv", "all-linear-dropout", "qv-qkv-bias"])
@pytest.mark.parametrize("ac", POLICIES)
def test_lora_under_every_policy(targets, dropout, over, ac):
    """A frozen base under AC: op-level policies keep the frozen projections' outputs and each adapter's two
    mm outputs (counted in the mm sequence), and a checkpointed first block keeps its input."""
    cfg = get_preset("tiny", **{**SMALL, **over})
    lora = LoraConfig(rank=8, targets=targets, dropout=dropout)
    measured = _run(cfg, ac, lora=lora)[0]
    frozen = Frozen(lora_targets=frozenset(lora.target_names()), lora_rank=8, lora_dropout=dropout)
    est = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac=ac, frozen=frozen).saved_bytes
    assert abs(est - measured) / measured < 0.01, (est, measured)


def test_checkpointing_does_not_change_the_gradients():
    """AC changes what is kept, never the math: every policy's gradients equal no AC's, over two steps under
    the same wrappers (the forward and recompute decisions of each call must agree every time)."""
    cfg = get_preset("tiny", **{**SMALL, "n_layers": 3})
    _, ref = _run(cfg, "none", steps=2)
    for ac in ("matmuls", "selective", "layer-2", "full"):
        _, grads = _run(cfg, ac, steps=2)
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, a=ac, n=name: f"{a} {n}: {m}")


@pytest.mark.parametrize("name", [*POLICIES, "layer-1", "layer-12", "layer-0", "layer--1", "layer-x", "layer-",
                                  "titan-op", "op", "Selective", "2", ""])
def test_trainer_and_planner_accept_the_same_names(name):
    try:
        trainer = parse_ac_policy(name)
    except ConfigError as e:
        assert str(e).startswith(f"parallel.activation_checkpoint={name!r} is not one of")
        trainer = None
    try:
        planner = parse_ac(name)
    except ValueError:
        planner = None
    assert trainer == planner
    assert (trainer is not None) == (name in POLICIES or name in ("layer-1", "layer-12"))


def test_suggest_searches_every_policy_the_trainer_applies():
    from lmforge.planner.activations import AC_MODES
    from lmforge.planner.estimate import SUGGEST_AC, PlanRequest, suggest

    assert set(AC_MODES) <= set(SUGGEST_AC) and any(ac.startswith("layer-") for ac in SUGGEST_AC)
    assert all(parse_ac_policy(ac) == parse_ac(ac) for ac in SUGGEST_AC)
    # Llama 3.1 8B, seq 8192 on 8 GPUs of 40 GB: torchtitan's op SAC is the fastest plan that fits
    s = suggest(PlanRequest("llama3.1-8b", gpus=8, gpu="h100", gpu_mem_gb=40, seq_len=8192))
    assert s["suggested"] and s["fits"] and s["ac"] == "selective", (s["ac"], s["parallel"])
