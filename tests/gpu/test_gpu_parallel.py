"""CUDA-only checks of the scale-out path on one GPU (skipped without CUDA; bench/gpu_check.sh runs them).

FSDP2 mixed precision (bf16 compute, fp32 master weights), torch.compile (inductor) per block,
selective AC + compile + FSDP2 together (the 7B recipe's combination), and the memory saved by
activation checkpointing, measured with the CUDA allocator.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from lmforge.distributed.apply import parallelize
from lmforge.distributed.config import ParallelConfig
from lmforge.distributed.process_group import init_distributed, shutdown_distributed
from lmforge.models.presets import model_config_from_dict
from lmforge.models.transformer import build_model

pytestmark = pytest.mark.gpu

SMALL = dict(vocab_size=1024, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=704, max_seq_len=256)


@pytest.fixture(scope="module")
def pg():
    """A one-process NCCL group on GPU 0 (FSDP2 needs a process group even on one GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed(timeout_s=300, device="cuda")
    yield info
    shutdown_distributed(info)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def batch(cfg, b=4, t=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (b, t + 1), device="cuda", generator=g)


def train(model, tokens, steps, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def test_fsdp2_bf16_keeps_fp32_master_weights_and_trains_like_fp32(pg):
    from torch.distributed.tensor import DTensor

    cfg = model_config_from_dict(SMALL)
    tokens = batch(cfg)
    ref = train(build_model(cfg, device="cuda", seed=0), tokens, 20)  # plain fp32
    model = build_model(cfg, device="cuda", seed=0)
    parallelize(model, ParallelConfig(param_dtype="bf16"), device=pg.device)
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(model, FSDPModule)  # FSDP2 over the size-1 mesh (bf16 compute asserted below)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert model(tokens[:, :-1]).dtype == torch.bfloat16  # compute runs in bf16
    losses = train(model, tokens, 20)
    assert losses[-1] < losses[0] - 1.0, losses  # memorizes the batch
    for a, b in zip(losses[:5], ref[:5]):
        assert abs(a - b) < 0.05, (losses[:5], ref[:5])  # bf16 rounding only


def test_compile_inductor_matches_eager(pg):
    import torch._dynamo

    torch._dynamo.reset()
    cfg = model_config_from_dict(SMALL)
    tokens = batch(cfg, seed=1)
    eager = train(build_model(cfg, device="cuda", seed=0), tokens, 4)
    model = build_model(cfg, device="cuda", seed=0)
    parallelize(model, ParallelConfig(compile=True, param_dtype="fp32"), device=pg.device)
    compiled = train(model, tokens, 4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for a, b in zip(compiled, eager):
        assert abs(a - b) < 2e-3, (compiled, eager)


@pytest.mark.parametrize("ac", ["matmuls", "selective"])
def test_recipe_combination_fsdp2_bf16_selective_ac_compile(pg, ac):
    """What lmforge/recipes/pretrain/llama2-7b.yaml runs (matmuls; selective is torchtitan's), on a small model: same
    losses as without AC/compile."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = model_config_from_dict(SMALL)
    tokens = batch(cfg, seed=2)
    plain = build_model(cfg, device="cuda", seed=0)
    parallelize(plain, ParallelConfig(param_dtype="bf16"), device=pg.device)
    base = train(plain, tokens, 8)
    model = build_model(cfg, device="cuda", seed=0)
    parallelize(model, ParallelConfig(param_dtype="bf16", activation_checkpoint=ac, compile=True),
                device=pg.device)
    got = train(model, tokens, 8)
    assert got[-1] < got[0]
    for a, b in zip(got, base):
        assert abs(a - b) < 0.05, (got, base)


def _peak_activation_bytes(ac: str) -> int:
    cfg = model_config_from_dict(dict(SMALL, dim=512, n_heads=8, n_kv_heads=8, ffn_hidden=1408, max_seq_len=1024))
    model = build_model(cfg, device="cuda", seed=0)
    parallelize(model, ParallelConfig(activation_checkpoint=ac, param_dtype="fp32"))
    tokens = batch(cfg, b=4, t=1024, seed=3)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
    after_forward = torch.cuda.memory_allocated() - base  # what autograd keeps for backward
    loss.backward()
    del loss
    return after_forward


def test_activation_checkpointing_cuts_saved_activations():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    none, mms, sel, full = (_peak_activation_bytes(ac) for ac in ("none", "matmuls", "selective", "full"))
    assert full < sel < mms < none, (none, mms, sel, full)
    assert full < 0.5 * none, (none, full)
