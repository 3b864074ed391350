"""torchtitan's AC policies as the planner models them (`titan-op`, `layer-N`), measured on the real
lmforge Transformer on CPU: the storages still alive after the forward pass.

`titan-op` is applied here exactly as torchtitan's op-level SAC does it: lmforge's own save list
(`lmforge.distributed.apply._save_ops`) with every second `mm` of a block recomputed. `layer-2` is
`apply_ac(..., "full")` on every second block (torchtitan's ``selective_ac_option = "2"``).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.planner.activations import estimate_activations

B, T = 2, 64
SMALL = {"n_layers": 4, "dim": 96, "n_heads": 6, "n_kv_heads": 2, "ffn_hidden": 200, "vocab_size": 300,
         "max_seq_len": 128, "tie_embeddings": False}


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


def _titan_op(model) -> None:
    """torchtitan's op SAC per block: save the listed ops' outputs except every second mm."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from lmforge.distributed.apply import _save_ops

    save, mm = _save_ops(), torch.ops.aten.mm.default

    def context_fn():
        meta = defaultdict(int)

        def policy(ctx, func, *args, **kwargs):
            mode = "recompute" if ctx.is_recompute else "forward"
            if func == mm:
                meta[mode] += 1
            keep = func in save and not (func == mm and meta[mode] % 2 == 0)
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

        return create_selective_checkpoint_contexts(policy)

    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        functools.update_wrapper(forward, inner)
        block.forward = forward


def _every_second_block_full(model) -> None:
    from torch import nn

    from lmforge.distributed.apply import apply_ac

    holder = nn.Module()
    holder.layers = [b for i, b in enumerate(model.layers) if (i + 1) % 2 == 0]  # blocks 2, 4 (torchtitan counts from 1)
    apply_ac(holder, "full")


def _retained(cfg, apply) -> int:
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    model.train()
    apply(model)
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    tracker = _Live(exclude)
    with tracker:
        loss = F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten())
        retained = tracker.live() - loss.untyped_storage().nbytes()
    loss.backward()
    return retained


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_titan_op_matches_autograd(activation):
    cfg = get_preset("tiny", **{**SMALL, "activation": activation})
    measured = _retained(cfg, _titan_op)
    est = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac="titan-op").saved_bytes
    sel = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac="selective").saved_bytes
    assert abs(est - measured) / measured < 0.03, (est, measured)
    assert est < sel


def test_layer_2_matches_autograd():
    cfg = get_preset("tiny", **SMALL)
    measured = _retained(cfg, _every_second_block_full)
    est = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac="layer-2").saved_bytes
    assert abs(est - measured) / measured < 0.03, (est, measured)
