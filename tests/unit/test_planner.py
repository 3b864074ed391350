"""`lmforge.planner.estimate`: state bytes, sharding, fits, FLOPs and time, --suggest."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError
from lmforge.models.presets import get_preset
from lmforge.planner.estimate import GB, PlanRequest, estimate, suggest


def test_seven_b_state_is_16_bytes_per_param_as_published():
    """Mixed-precision AdamW: fp32 master weights + fp32 grads + m + v = 16 bytes/param (ZeRO, Rajbhandari
    et al. 2020, count 2+2+12; FSDP2 keeps 4+4+8). Llama-2-7B: 6.74e9 x 16 = 107.8 GB before activations."""
    p = estimate(PlanRequest("llama2-7b", gpus=1, gpu="h200"))
    state = p["memory_gb"]["weights"] + p["memory_gb"]["grads"] + p["memory_gb"]["optimizer"]
    assert p["params"] == 6_738_415_616
    assert p["bytes_per_param"]["total"] == 16
    assert state == pytest.approx(6_738_415_616 * 16 / GB, rel=1e-3)
    # ~108 GB of state + ~23 GB of activations per 4096-token sequence: micro batch 2 needs full AC on an H200
    assert not estimate(PlanRequest("llama2-7b", gpus=1, gpu="h200", micro_batch=2))["fits"]
    assert estimate(PlanRequest("llama2-7b", gpus=1, gpu="h200", micro_batch=2, ac="full"))["fits"]


def test_sharding_divides_state_and_not_activations():
    one = estimate(PlanRequest("llama2-7b", gpus=8, dp_shard=1, dp_replicate=8))
    eight = estimate(PlanRequest("llama2-7b", gpus=8))
    assert one["parallel"]["wrapper"] == "ddp" and eight["parallel"]["wrapper"] == "fsdp"
    assert eight["memory_gb"]["optimizer"] == pytest.approx(one["memory_gb"]["optimizer"] / 8, rel=1e-3)
    assert eight["memory_gb"]["activations"] == one["memory_gb"]["activations"]
    tp2 = estimate(PlanRequest("llama2-7b", gpus=8, tp=2))
    assert tp2["parallel"]["dp_shard"] == 4 and tp2["parallel"]["sequence_parallel"]
    assert tp2["memory_gb"]["activations"] < eight["memory_gb"]["activations"]
    assert tp2["memory_gb"]["weights"] == pytest.approx(eight["memory_gb"]["weights"], rel=1e-3)


def test_activation_checkpointing_and_micro_batch_scale_activations():
    base = {"model": "llama2-7b", "gpus": 8}
    none, mm, sel, full = (estimate(PlanRequest(**base, ac=ac))["memory_gb"]["activations"]
                           for ac in ("none", "matmuls", "selective", "full"))
    assert full < sel < mm < none
    two = estimate(PlanRequest(**base, micro_batch=2))["memory_gb"]["activations"]
    assert two == pytest.approx(2 * none, rel=1e-3)
    # full AC keeps one bf16 block input per layer: dim x 2 bytes per token
    assert estimate(PlanRequest(**base, ac="full"))["activation_bytes_per_token_per_layer"] == 4096 * 2


def test_eight_bit_optimizer_quarter_of_adamw_state():
    a = estimate(PlanRequest("llama2-7b", gpus=8))["memory_gb"]["optimizer"]
    b = estimate(PlanRequest("llama2-7b", gpus=8, optimizer="adamw8bit"))["memory_gb"]["optimizer"]
    assert b / a == pytest.approx(0.25, rel=0.01)


# Llama-2-7B training FLOPs per token at T = 4096, derived by hand (PaLM, Chowdhery et al. 2022, App. B:
# 6N + 12·L·H·Q·T): N = matmul weights = 32 x (4 x 4096^2 + 3 x 4096 x 11008) + 32000 x 4096 (head)
# = 6,607,077,376 -> 6N = 39,642,464,256; attention 12 x 32 x 32 x 128 x 4096 = 6,442,450,944.
LLAMA2_7B_FLOPS_PER_TOKEN_4096 = 46_084_915_200


def test_flops_chinchilla_and_hours():
    cfg = get_preset("llama2-7b")
    p = estimate(PlanRequest("llama2-7b", gpus=8, gpu="h100", tokens=1e12, mfu=0.5))
    assert p["flops"]["per_token"] == LLAMA2_7B_FLOPS_PER_TOKEN_4096
    assert p["flops"]["total"] == pytest.approx(LLAMA2_7B_FLOPS_PER_TOKEN_4096 * 1e12)
    assert p["chinchilla_tokens"] == 20 * 6_738_415_616 == 20 * cfg.num_params()
    expected_h = LLAMA2_7B_FLOPS_PER_TOKEN_4096 * 1e12 / (8 * 989.4e12 * 0.5) / 3600
    assert p["hours"] == pytest.approx(expected_h, rel=1e-3)
    assert p["gpu_hours"] == pytest.approx(8 * expected_h, rel=1e-3)
    # full AC recomputes the blocks' forward: about a third more FLOPs, so fewer tokens/s
    f = estimate(PlanRequest("llama2-7b", gpus=8, gpu="h100", tokens=1e12, mfu=0.5, ac="full"))
    assert 1.3 < f["mfu"]["recompute_factor"] < 1.34 and f["hours"] > p["hours"]
    fp32 = estimate(PlanRequest("llama2-7b", gpus=8, gpu="h100", tokens=1e12, precision="fp32"))
    assert fp32["peak_tflops"] == 494.7 and fp32["memory_gb"]["activations"] > p["memory_gb"]["activations"]


def test_fits_against_gpu_memory():
    p = estimate(PlanRequest("llama2-7b", gpus=8, gpu_mem_gb=80))
    assert p["fits"] and p["headroom_gb"] == pytest.approx(80 - p["memory_gb"]["total"], abs=1e-3)
    q = estimate(PlanRequest("llama2-7b", gpus=8, gpu_mem_gb=24))
    assert not q["fits"] and q["headroom_gb"] < 0
    parts = sum(v for k, v in p["memory_gb"].items() if k != "total")
    assert parts == pytest.approx(p["memory_gb"]["total"], abs=0.01)


def test_suggest_returns_fastest_plan_that_fits():
    s = suggest(PlanRequest("llama3-8b", gpus=8, gpu="a100-40g"))
    assert s["suggested"] and s["fits"] and s["memory_gb"]["total"] <= 40
    for alt in s["alternatives"]:  # sorted: nothing listed is faster than the pick
        assert alt["tokens_per_s"] <= s["tokens_per_s"] + 1e-6
    # plenty of memory: no checkpointing, no tensor parallelism needed
    roomy = suggest(PlanRequest("tiny", gpus=2, gpu="h100"))
    assert roomy["ac"] == "none" and roomy["parallel"]["tp"] == 1 and roomy["micro_batch"] == 64
    # impossible: a 13B model on one 24 GB card reports the smallest plan, not a fit
    none = suggest(PlanRequest("llama2-13b", gpus=1, gpu="4090"))
    assert none["suggested"] is False and not none["fits"]


@pytest.mark.parametrize("kwargs, match", [
    ({"gpus": 8, "tp": 3}, "does not divide --gpus 8"),
    ({"gpus": 8, "dp_shard": 3}, "!= --gpus 8"),
    ({"gpus": 8, "tp": 8, "model": "llama3-8b", "dp_shard": 1}, None),
    ({"gpus": 16, "tp": 16}, "span nodes"),
    ({"gpus": 6, "tp": 6}, "does not divide the model's n_heads=32"),
    ({"gpus": 4, "tp": 2, "dp_replicate": 2, "dp_shard": 1}, "DDP"),
    ({"seq_len": 100_000}, "max_seq_len"),
    ({"mfu": 1.5}, "--mfu"),
    ({"gpu": "h300"}, "did you mean 'h200'"),
    ({"model": "llama2-7c"}, "did you mean 'llama2-7b'"),
])
def test_bad_requests_name_the_fix(kwargs, match):
    kwargs = {"model": "llama2-7b", **kwargs}
    if match is None:
        assert estimate(PlanRequest(**kwargs))["parallel"]["tp"] == 8
        return
    with pytest.raises(ConfigError, match=match):
        estimate(PlanRequest(**kwargs))
