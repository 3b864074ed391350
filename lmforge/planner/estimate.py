"""What a training plan needs per GPU, and how long it takes — from the model config alone.

Memory per GPU (GB = 10^9 bytes), following what `lmforge.distributed.apply` and the trainer do:

* weights / grads / optimizer: FSDP2 keeps fp32 master weights, fp32 gradients and AdamW's fp32 m and v
  (or 8-bit m and v with blockwise fp32 scales) sharded over ``tp x dp_shard`` ranks (norm weights are
  replicated across TP): 4 + 4 + 8 = 16 bytes per parameter before sharding. bf16 training keeps the
  same fp32 state; the bf16 copies are the all-gathered compute weights, counted under buffers.
* activations: what autograd holds from forward to backward for one micro batch
  (`lmforge.planner.activations`, held to the real model by tests).
* buffers: the backward transient above the saved activations (fp32 logit gradients, or one block's
  recompute + gradients in flight + its unsharded weight gradients), FSDP2's unsharded compute copies
  (the root module — embeddings, final norm, head — stays gathered through the step, plus two blocks:
  the current one and the prefetched next), DDP's gradient buckets, a fixed CUDA context / workspace
  overhead and an allocator-fragmentation margin.

Time: training FLOPs per token from `ModelConfig.flops_per_token` (6·N + 12·L·H·Q·T), plus the
forward a checkpointed block recomputes; hours = FLOPs / (GPUs x peak x MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lmforge.config import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.planner.activations import (
    AC_MODES,
    estimate_activations,
    largest_weight_elements,
    logits_transient_bytes,
)
from lmforge.planner.hardware import GPU, GPUS, GPUS_PER_NODE, get_gpu

GB = 1e9
FP32 = 4
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. (2022)
OPTIMIZER_BYTES = {
    "adamw": 8.0,  # fp32 exp_avg + exp_avg_sq
    # bitsandbytes-style blockwise 8-bit: two uint8 states + one fp32 absmax per 2048-value block each
    "adamw8bit": 2.0 + 2 * FP32 / 2048,
}
PRECISIONS = ("bf16", "fp32")
# Tensor-parallel collectives sit on the critical path (sequence-parallel all-gather / reduce-scatter
# twice per block, forward and backward). Assumed cost, not measured here: 5% per doubling of tp.
TP_EFFICIENCY_PER_DOUBLING = 0.05
CUDA_CONTEXT_GB = 1.0  # CUDA context, cuBLAS / NCCL workspaces (~0.5-1 GB on recent GPUs)
FRAGMENTATION = 0.05  # caching-allocator fragmentation margin on everything else


@dataclass
class PlanRequest:
    model: str | ModelConfig
    gpus: int = 1
    gpu: str = "h100"
    gpu_mem_gb: float | None = None  # default: the GPU preset's memory
    peak_tflops: float | None = None  # default: the GPU preset's dense peak for the precision
    seq_len: int | None = None  # default: the model's max_seq_len
    micro_batch: int = 1
    dp_shard: int = -1  # -1: gpus / (dp_replicate * tp)
    tp: int = 1
    dp_replicate: int = 1
    ac: str = "none"
    precision: str = "bf16"
    optimizer: str = "adamw"
    tokens: float | None = None
    mfu: float = 0.4
    doc_mask: bool = False
    device: str = "cuda"
    model_name: str | None = None  # for display when `model` is a config


def _resolve_model(req: PlanRequest) -> tuple[ModelConfig, str]:
    if isinstance(req.model, ModelConfig):
        return req.model, req.model_name or "custom"
    from lmforge.models.presets import get_preset

    return get_preset(req.model), req.model


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def validate(req: PlanRequest, cfg: ModelConfig) -> tuple[int, int]:
    """Check the request; returns (seq_len, dp_shard) resolved."""
    if req.gpus < 1:
        raise ConfigError(f"--gpus {req.gpus} must be >= 1")
    if req.micro_batch < 1:
        raise ConfigError(f"--micro-batch {req.micro_batch} must be >= 1")
    if req.tp < 1 or req.dp_replicate < 1:
        raise ConfigError(f"--tp {req.tp} and --dp-replicate {req.dp_replicate} must be >= 1")
    if req.ac not in AC_MODES:
        raise ConfigError(f"--ac {req.ac!r} is not one of {', '.join(AC_MODES)}")
    if req.precision not in PRECISIONS:
        raise ConfigError(f"--precision {req.precision!r} is not one of {', '.join(PRECISIONS)}")
    if req.optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"--optimizer {req.optimizer!r} is not one of {', '.join(OPTIMIZER_BYTES)}")
    if not 0 < req.mfu <= 1:
        raise ConfigError(f"--mfu {req.mfu} must be a fraction in (0, 1], e.g. 0.4")
    if req.tokens is not None and not req.tokens > 0:
        raise ConfigError(f"--tokens {req.tokens} must be > 0 (e.g. 2e12)")
    if req.gpu_mem_gb is not None and not req.gpu_mem_gb > 0:
        raise ConfigError(f"--gpu-mem-gb {req.gpu_mem_gb} must be > 0")
    if req.peak_tflops is not None and not req.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops {req.peak_tflops} must be > 0")
    seq_len = req.seq_len or cfg.max_seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is outside 1..{cfg.max_seq_len} (the model's max_seq_len); "
                          f"choose --seq-len <= {cfg.max_seq_len}")
    shard = req.dp_shard
    if shard == -1:
        if req.gpus % (req.dp_replicate * req.tp):
            raise ConfigError(
                f"--dp-replicate {req.dp_replicate} x --tp {req.tp} does not divide --gpus {req.gpus}; "
                f"choose degrees whose product divides it (divisors: {', '.join(map(str, _divisors(req.gpus)))})")
        shard = req.gpus // (req.dp_replicate * req.tp)
    if shard < 1 or req.dp_replicate * shard * req.tp != req.gpus:
        raise ConfigError(f"--dp-replicate {req.dp_replicate} x --dp-shard {shard} x --tp {req.tp} = "
                          f"{req.dp_replicate * shard * req.tp} != --gpus {req.gpus}; "
                          "leave --dp-shard out to fill the rest, or change the degrees")
    if req.tp > 1:
        if req.tp > GPUS_PER_NODE:
            raise ConfigError(f"--tp {req.tp} would span nodes; keep tp <= {GPUS_PER_NODE} and add dp_shard")
        for name, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads),
                            ("FFN width", cfg.hidden_dim), ("dim", cfg.dim), ("vocab_size", cfg.vocab_size)):
            if value % req.tp:
                ok = [k for k in _divisors(value) if k <= GPUS_PER_NODE]
                raise ConfigError(f"--tp {req.tp} does not divide the model's {name}={value}; "
                                  f"use --tp in {', '.join(map(str, ok))}")
        if shard == 1 and req.dp_replicate > 1:
            raise ConfigError(f"--dp-replicate {req.dp_replicate} with --tp {req.tp} and dp_shard=1 means DDP, "
                              "which does not compose with tensor parallel; use --dp-shard > 1 instead")
    return seq_len, shard


def _norm_params(cfg: ModelConfig) -> int:
    n = 2 * cfg.n_layers + int(bool(cfg.final_norm)) + int(cfg.embedding_norm)
    return n * cfg.dim * (2 if cfg.norm == "layernorm" else 1)


def _recompute_flops_per_token(cfg: ModelConfig, seq_len: int, ac: str) -> float:
    """Extra forward FLOPs per token that activation checkpointing spends in backward."""
    if ac == "none":
        return 0.0
    head = cfg.vocab_size * cfg.dim if cfg.lm_head else 0
    block_matmuls = 2 * (cfg.matmul_params() - head)  # forward matmul FLOPs of all blocks
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # forward scores + PV
    if ac == "full":
        return block_matmuls + attention
    # selective keeps every matmul and fused-attention output: only pointwise ops are recomputed
    return attention if cfg.attention == "reference" else 0.0


def estimate(req: PlanRequest) -> dict[str, Any]:
    """One plan -> a JSON-able dict (memory per GPU, fits, FLOPs, time)."""
    cfg, name = _resolve_model(req)
    T, shard = validate(req, cfg)
    if req.gpu_mem_gb is not None and req.peak_tflops is not None and req.gpu.lower() not in GPUS:
        gpu = GPU(req.gpu, req.gpu_mem_gb, req.peak_tflops, req.peak_tflops)  # a custom accelerator
    else:
        gpu = get_gpu(req.gpu)
    mem_gb = req.gpu_mem_gb if req.gpu_mem_gb is not None else gpu.memory_gb
    tp, B = req.tp, req.micro_batch
    bf16 = req.precision == "bf16"
    a = 2 if bf16 else FP32
    on_gpu = req.device == "cuda"

    # ---- which data-parallel wrapper `lmforge.distributed.apply.parallelize` picks ----------
    if shard > 1:
        wrapper = "hsdp" if req.dp_replicate > 1 else "fsdp"
    elif req.dp_replicate > 1:
        wrapper = "ddp"
    else:  # one data-parallel rank: FSDP2 over a size-1 mesh on CUDA with bf16 (fp32 masters)
        wrapper = "fsdp" if (on_gpu and bf16) else "none"

    # ---- parameters, gradients, optimizer state -------------------------------------------
    P = cfg.num_params()
    norm_p = _norm_params(cfg)
    per_rank = ((P - norm_p) / tp + norm_p) / shard
    opt_b = OPTIMIZER_BYTES[req.optimizer]
    weights, grads, optimizer = per_rank * FP32, per_rank * FP32, per_rank * opt_b

    # ---- activations ------------------------------------------------------------------------
    acts = estimate_activations(cfg, B, T, act_bytes=a, device=req.device, ac=req.ac, tp=tp,
                                doc_mask=req.doc_mask)
    saved = acts.saved_bytes

    layer_p = cfg.layer_params() / tp
    root_p = (P - cfg.n_layers * cfg.layer_params()) / tp  # embeddings, final norm, head
    unsharded = ddp_buckets = 0.0
    if wrapper in ("fsdp", "hsdp"):
        # compute copies: the root stays gathered, plus the current and the prefetched block
        unsharded = (root_p + 2 * layer_p) * a
        # a block's unsharded grads (compute dtype, + an fp32 copy for the fp32 reduce-scatter), and
        # the root's (the head's gradient is produced first and reduced last)
        block_grads = layer_p * (a + (FP32 if bf16 else 0)) + root_p * a
    else:
        block_grads = FP32 * largest_weight_elements(cfg, tp)  # one weight gradient at a time
        if wrapper == "ddp":
            ddp_buckets = per_rank * FP32  # flat gradient buckets beside .grad
            if bf16:  # autocast's bf16 weight copies, kept by the matmuls for backward
                unsharded = (cfg.matmul_params() / tp) * a
    transient = acts.transient_bytes(logits_transient_bytes(cfg, B, T), block_grad_bytes=block_grads)
    context = CUDA_CONTEXT_GB * GB if on_gpu else 0.0
    subtotal = weights + grads + optimizer + saved + transient + unsharded + ddp_buckets + context
    fragmentation = FRAGMENTATION * subtotal if on_gpu else 0.0
    buffers = transient + unsharded + ddp_buckets + context + fragmentation
    total = subtotal + fragmentation

    # ---- FLOPs and time ---------------------------------------------------------------------
    per_token = cfg.flops_per_token(T)
    recompute = _recompute_flops_per_token(cfg, T, req.ac)
    recompute_factor = (per_token + recompute) / per_token
    tp_eff = 1 - TP_EFFICIENCY_PER_DOUBLING * math.log2(tp)
    mfu_eff = req.mfu * tp_eff / recompute_factor
    peak_tflops = req.peak_tflops or (gpu.bf16_tflops if bf16 else gpu.tf32_tflops)
    tokens_per_s = req.gpus * peak_tflops * 1e12 * mfu_eff / per_token
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * P
    tokens = req.tokens if req.tokens is not None else chinchilla

    def gb(x: float) -> float:
        return round(x / GB, 3)

    out: dict[str, Any] = {
        "model": name,
        "params": P,
        "params_per_gpu": round(per_rank),
        "gpus": req.gpus,
        "gpu": req.gpu,
        "gpu_mem_gb": mem_gb,
        "parallel": {"dp_replicate": req.dp_replicate, "dp_shard": shard, "tp": tp, "wrapper": wrapper,
                     "sequence_parallel": tp > 1},
        "seq_len": T,
        "micro_batch": B,
        "tokens_per_micro_batch": B * T * req.dp_replicate * shard,
        "ac": req.ac,
        "precision": req.precision,
        "optimizer": req.optimizer,
        "doc_mask": req.doc_mask,
        "memory_gb": {"weights": gb(weights), "grads": gb(grads), "optimizer": gb(optimizer),
                      "activations": gb(saved), "buffers": gb(buffers), "total": gb(total)},
        "memory_detail_gb": {
            "activations_per_layer": gb(acts.layer_bytes),
            "activations_outside_layers": gb(acts.outside_bytes),
            "backward_transient": gb(transient),
            "unsharded_compute_weights": gb(unsharded),
            "ddp_buckets": gb(ddp_buckets),
            "cuda_context": gb(context),
            "fragmentation": gb(fragmentation),
        },
        "bytes_per_param": {"weights": FP32, "grads": FP32, "optimizer": round(opt_b, 4),
                            "total": round(2 * FP32 + opt_b, 4)},
        "activation_bytes_per_token_per_layer": round(acts.layer_bytes / (B * T), 1),
        "fits": total <= mem_gb * GB,
        "headroom_gb": round(mem_gb - total / GB, 3),
        "flops": {"per_token": per_token, "tokens": tokens, "total": per_token * tokens,
                  "recompute_per_token": recompute},
        "chinchilla_tokens": chinchilla,
        "mfu": {"assumed": req.mfu, "effective": round(mfu_eff, 4), "recompute_factor": round(recompute_factor, 4),
                "tp_efficiency": round(tp_eff, 4)},
        "peak_tflops": peak_tflops,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / req.gpus, 1),
        "hours_chinchilla": round(chinchilla / tokens_per_s / 3600, 2),
    }
    if req.tokens is not None:
        hours = req.tokens / tokens_per_s / 3600
        out.update(tokens=req.tokens, hours=round(hours, 2), gpu_hours=round(hours * req.gpus, 1),
                   days=round(hours / 24, 2))
    return out


def suggest(req: PlanRequest, top: int = 5) -> dict[str, Any]:
    """Search micro batch, activation checkpointing, dp_shard and tp for the fastest plan that fits.

    Fastest = highest effective MFU (recompute and TP cost); ties go to less checkpointing (selective
    recomputes no matmuls but still re-runs the pointwise ops), then the larger micro batch (fewer
    FSDP all-gathers per token), then more memory headroom. `req.micro_batch` is the upper bound of the micro-batch search when > 1.
    """
    cfg, _ = _resolve_model(req)
    max_mb = req.micro_batch if req.micro_batch > 1 else 64
    micro_batches = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= max_mb]
    if max_mb not in micro_batches:
        micro_batches.append(max_mb)
    candidates, best_effort = [], None
    for tp in _divisors(req.gpus):
        if tp > GPUS_PER_NODE or any(v % tp for v in (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim,
                                                     cfg.dim, cfg.vocab_size)):
            continue
        for shard in _divisors(req.gpus // tp):
            rep = req.gpus // (tp * shard)
            if shard == 1 and rep > 1 and tp > 1:
                continue  # DDP x TP does not compose
            for ac_rank, ac in enumerate(AC_MODES):
                for mb in micro_batches:
                    plan = estimate(replace(req, tp=tp, dp_shard=shard, dp_replicate=rep, ac=ac, micro_batch=mb))
                    key = (-plan["mfu"]["effective"], ac_rank, -mb, -plan["headroom_gb"], tp)
                    if plan["fits"]:
                        candidates.append((key, plan))
                    elif best_effort is None or plan["memory_gb"]["total"] < best_effort["memory_gb"]["total"]:
                        best_effort = plan
                    if not plan["fits"]:
                        break  # a larger micro batch needs more memory still
    if not candidates:
        assert best_effort is not None
        return {**best_effort, "suggested": False, "alternatives": [],
                "note": "no plan fits: the smallest shown; add GPUs, use --optimizer adamw8bit or a shorter --seq-len"}
    candidates.sort(key=lambda kv: kv[0])
    best = candidates[0][1]
    alts = [{"dp_replicate": p["parallel"]["dp_replicate"], "dp_shard": p["parallel"]["dp_shard"],
             "tp": p["parallel"]["tp"], "ac": p["ac"], "micro_batch": p["micro_batch"],
             "total_gb": p["memory_gb"]["total"], "tokens_per_s": p["tokens_per_s"]}
            for _, p in candidates[1:top + 1]]
    return {**best, "suggested": True, "candidates_that_fit": len(candidates), "alternatives": alts}


__all__ = ["PlanRequest", "estimate", "suggest", "validate"]
