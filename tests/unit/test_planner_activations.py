"""The planner's activation model against what autograd really keeps on the real lmforge Transformer.

Three measurements, all on CPU in fp32 with small configs:
  * saved tensors: the unique storages autograd packs (``saved_tensors_hooks``), parameters excluded;
  * retained storages after forward with activation checkpointing (the real `apply_ac`), counted by
    a dispatch mode that weak-references every storage an op produces;
  * the peak of live storages through forward + backward (parameters and their .grad excluded).
The planner must hold each within 10% (it is in fact exact to a few bytes for the first two).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.planner.activations import estimate_activations, largest_weight_elements, logits_transient_bytes

B = 2
SMALL = {"n_layers": 2, "dim": 96, "n_heads": 6, "ffn_hidden": 200, "vocab_size": 300, "max_seq_len": 128}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _batch(cfg, T, seed=0, doc_mask=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = None
    if doc_mask:  # two packed documents per row: attend only within a document
        doc = (torch.arange(T) >= T // 3).long().expand(B, T)
        mask = (doc[:, None, :, None] == doc[:, None, None, :])
    return tokens, targets, mask


def _loss(cfg, out, targets):
    if cfg.lm_head:  # as lmforge.train.trainer.causal_lm_loss: fp32 log-probs
        return F.cross_entropy(out.flatten(0, 1).float(), targets.flatten())
    return out.pow(2).float().mean()  # an encoder: any head saves the final hidden states


def measure_saved(cfg, T, doc_mask=False, bf16=False) -> int:
    """Bytes of the unique non-parameter storages autograd saves for backward.

    bf16: bf16 weights under bf16 autocast, as the trainer runs on GPU (FSDP2 casts the weights)."""
    import contextlib

    model = build_model(cfg, seed=0, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.train()
    params = {_storage_key(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = _storage_key(t)
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    tokens, targets, mask = _batch(cfg, T, doc_mask=doc_mask)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(cfg, model(tokens, mask=mask), targets)
    return sum(seen.values())


class LiveStorages(TorchDispatchMode):
    """Weak references to every storage an op produces; `live()` sums those still alive."""

    def __init__(self, exclude=(), track_peak=False):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.exclude = set(exclude)
        self.track_peak, self.peak = track_peak, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.refs[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        if self.track_peak:
            self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        return sum(n for key, (ref, n) in self.refs.items() if key not in self.exclude and not ref.expired())


def measure_retained_and_peak(cfg, T, ac):
    """(bytes retained after forward, peak live bytes during backward), with `apply_ac(model, ac)`."""
    from lmforge.distributed.apply import apply_ac

    model = build_model(cfg, seed=0)
    model.train()
    apply_ac(model, ac)
    for p in model.parameters():  # pre-allocated: accumulation then happens in place, untracked
        p.grad = torch.zeros_like(p)
    exclude = {_storage_key(t) for t in [*model.parameters(), *(p.grad for p in model.parameters()),
                                         *model.buffers()]}
    tracker = LiveStorages(exclude)
    with tracker:
        tokens, targets, _ = _batch(cfg, T)
        loss = _loss(cfg, model(tokens), targets)
        retained = tracker.live() - tracker.refs[_storage_key(loss)][1]
        tracker.track_peak, tracker.peak = True, 0
        loss.backward()
    return retained, tracker.peak


def _rel(est: float, meas: float) -> float:
    return abs(est - meas) / meas


CASES = {
    "llama-gqa": ("tiny", {"n_kv_heads": 2}),
    "mha": ("tiny", {"n_kv_heads": 6}),
    "mqa-gelu": ("tiny", {"n_kv_heads": 1, "activation": "gelu"}),
    "gqa-dropout": ("tiny", {"n_kv_heads": 3, "dropout": 0.1}),  # SDPA math fallback on CPU
    "reference-attn": ("tiny", {"n_kv_heads": 2, "attention": "reference"}),
    "layernorm-relu": ("tiny", {"norm": "layernorm", "activation": "relu"}),
    "qwen-qkv-bias": ("qwen2.5-7b", {"n_kv_heads": 2}),
    "gpt2": ("gpt2-124m", {}),
    "bert": ("bert-base", {}),
    "transformer-base": ("transformer-base", {}),
}


@pytest.mark.parametrize("T", [24, 80])
@pytest.mark.parametrize("case", list(CASES))
def test_saved_tensors_match_autograd(case, T):
    preset, over = CASES[case]
    cfg = get_preset(preset, **{**SMALL, **over})
    measured = measure_saved(cfg, T)
    est = estimate_activations(cfg, B, T, act_bytes=4, device="cpu").saved_bytes
    assert _rel(est, measured) < 0.10, (case, T, est, measured)
    assert abs(est - measured) <= 16, "the model is built tensor by tensor; only scalars may differ"


@pytest.mark.parametrize("case", ["llama-gqa", "mqa-gelu", "gqa-dropout", "reference-attn", "gpt2", "bert"])
def test_saved_tensors_bf16_autocast(case):
    """bf16 activations, with norms and the loss kept in fp32 by autocast."""
    preset, over = CASES[case]
    cfg = get_preset(preset, **{**SMALL, **over})
    measured = measure_saved(cfg, 48, bf16=True)
    est = estimate_activations(cfg, B, 48, act_bytes=2, device="cpu").saved_bytes
    assert _rel(est, measured) < 0.10, (case, est, measured)
    assert abs(est - measured) <= 16


def test_doc_mask_bias_is_counted():
    cfg = get_preset("tiny", **{**SMALL, "n_kv_heads": 2})
    measured = measure_saved(cfg, 64, doc_mask=True)
    est = estimate_activations(cfg, B, 64, act_bytes=4, device="cpu", doc_mask=True).saved_bytes
    plain = estimate_activations(cfg, B, 64, act_bytes=4, device="cpu").saved_bytes
    assert _rel(est, measured) < 0.10, (est, measured)
    assert abs(est - measured) <= 16 < measured - plain  # the per-block mask bias is what differs


AC_CASES = {
    "llama-gqa": {"n_kv_heads": 2, "n_layers": 3, "tie_embeddings": False},
    "gelu-mha": {"n_kv_heads": 6, "activation": "gelu", "ffn_hidden": 512, "n_layers": 3, "tie_embeddings": False},
    "dropout": {"n_kv_heads": 3, "dropout": 0.1, "n_layers": 3, "tie_embeddings": False},
    "bias-qkv": {"n_kv_heads": 2, "n_layers": 3, "tie_embeddings": False, "qkv_bias": True},  # addmm, not mm
}


@pytest.mark.parametrize("ac", ["none", "matmuls", "selective", "layer-2", "full"])
@pytest.mark.parametrize("case", list(AC_CASES))
def test_checkpointed_activations_and_peak(case, ac):
    cfg = get_preset("tiny", **{**SMALL, **AC_CASES[case]})
    T = 96
    retained, peak = measure_retained_and_peak(cfg, T, ac)
    acts = estimate_activations(cfg, B, T, act_bytes=4, device="cpu", ac=ac)
    assert _rel(acts.saved_bytes, retained) < 0.10, (case, ac, acts.saved_bytes, retained)
    est_peak = acts.saved_bytes + acts.transient_bytes(logits_transient_bytes(cfg, B, T),
                                                       block_grad_bytes=4 * largest_weight_elements(cfg))
    assert _rel(est_peak, peak) < 0.10, (case, ac, est_peak, peak)


def test_checkpointing_orders_memory():
    """Sanity on the measured side too: full < selective < matmuls < none, full < layer-2 < none, and the
    planner agrees."""
    cfg = get_preset("tiny", **{**SMALL, "n_kv_heads": 2, "n_layers": 4})
    measured = {ac: measure_retained_and_peak(cfg, 64, ac)[0]
                for ac in ("none", "matmuls", "selective", "layer-2", "full")}
    est = {ac: estimate_activations(cfg, B, 64, act_bytes=4, device="cpu", ac=ac).saved_bytes
           for ac in measured}
    for sizes in (measured, est):
        assert sizes["full"] < sizes["selective"] < sizes["matmuls"] < sizes["none"], sizes
        assert sizes["full"] < sizes["layer-2"] < sizes["none"], sizes


def test_tensor_parallel_splits_heads_and_sequence():
    cfg = get_preset("llama2-7b")
    one = estimate_activations(cfg, 1, 4096, tp=1)
    two = estimate_activations(cfg, 1, 4096, tp=2)
    # everything in a block is split by tp except the all-gathered inputs of q/k/v and w1/w3
    gathered = 2 * 4096 * cfg.dim * 2
    assert two.layer_bytes == pytest.approx((one.layer_bytes - gathered) / 2 + gathered)
