"""What a training plan needs per GPU, and how long it takes — from the model config alone.

Memory per GPU (GB = 10^9 bytes), following what `lmforge.distributed.apply` and the trainer do:

* weights / grads / optimizer: FSDP2 keeps fp32 master weights, fp32 gradients and AdamW's fp32 m and v
  (or 8-bit m and v with blockwise fp32 scales) sharded over ``tp x dp_shard`` ranks (norm weights are
  replicated across TP): 4 + 4 + 8 = 16 bytes per parameter before sharding. bf16 training keeps the
  same fp32 state; the bf16 copies are the all-gathered compute weights, counted under buffers. Gradients
  stay sharded through gradient accumulation too: the trainer reduce-scatters every micro batch under
  FSDP2 (`lmforge.distributed.world.no_sync`; HSDP defers only the all-reduce across replicas).
* activations: what autograd holds from forward to backward for one micro batch
  (`lmforge.planner.activations`, held to the real model by tests).
* buffers: the backward transient above the saved activations (fp32 logit gradients, or one block's
  recompute + gradients in flight + its unsharded weight gradients), FSDP2's unsharded compute copies
  (the root module — embeddings, final norm, head — stays gathered through the step, plus two blocks:
  the current one and the prefetched next), DDP's gradient buckets, the KV cache (inference), and the
  allocator terms of `lmforge.planner.allocator` (stranded segments, CUDA context, NCCL).

Modes (`lmforge.planner.modes`): pretrain / full fine-tuning, LoRA, QLoRA, DPO, reward model, inference.

Time: training FLOPs per token from `ModelConfig.flops_per_token` (6·N + 12·L·H·Q·T), plus the
forward a checkpointed block recomputes; hours = FLOPs / (GPUs x peak x MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from lmforge.config import ConfigError
from lmforge.models.config import ModelConfig
from lmforge.models.presets import get_preset
from lmforge.planner import allocator
from lmforge.planner.activations import (
    Frozen,
    _linears,
    estimate_activations,
    largest_weight_elements,
    logits_transient_bytes,
    parse_ac,
)
from lmforge.planner.hardware import GPU, GPUS, GPUS_PER_NODE, get_gpu
from lmforge.planner.modes import (
    DPO_REFERENCES,
    MODES,
    OPTIMIZERS,
    QUANTS,
    head_params,
    kv_cache_bytes,
    lora_targets,
    projection_shapes,
    reward_config,
    state_bytes,
)

GB = 1e9
FP32 = 4
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. (2022)
PRECISIONS = ("bf16", "fp32")
# Tensor-parallel collectives sit on the critical path (sequence-parallel all-gather / reduce-scatter
# twice per block, forward and backward). Assumed cost, not measured here: 5% per doubling of tp.
TP_EFFICIENCY_PER_DOUBLING = 0.05
# bitsandbytes' 4-bit matmuls dequantize every weight on every use: litgpt's resource table times 1k
# iterations of Llama-2-7B LoRA at 2.36 min and QLoRA (nf4) at 3.68 min on one A100 (a measured ratio).
QLORA_SPEED = 2.36 / 3.68


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
    mode: str = "pretrain"
    lora_rank: int = 8
    lora_targets: str = "wq,wv"
    lora_dropout: float = 0.0
    quant: str | None = None  # qlora: nf4-dq unless given; infer: none unless given
    dpo_reference: str = "model"
    # Framework facts for plans of other trainers (calibration rows); lmforge's trainer: False, True.
    fp32_logits_held: bool = False  # the loop keeps fp32 logits through backward (Fabric bf16-true)
    logits_freed_before_backward: bool = True  # the compute-dtype logits are dropped before backward
    lora_shared_dropout: bool = False  # one dropout for the adapters on q/k/v (litgpt's fused qkv)
    quantize_head: bool = False  # NF4 for the LM head too (PEFT / transformers keep it 16-bit)


def _resolve_model(req: PlanRequest) -> tuple[ModelConfig, str]:
    if isinstance(req.model, ModelConfig):
        return req.model, req.model_name or "custom"

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
    try:
        parse_ac(req.ac)
        lora_targets(req.lora_targets)
    except ValueError as e:
        raise ConfigError(str(e).replace("ac=", "--ac ")) from None
    if req.mode not in MODES:
        raise ConfigError(f"--mode {req.mode!r} is not one of {', '.join(MODES)}")
    if req.precision not in PRECISIONS:
        raise ConfigError(f"--precision {req.precision!r} is not one of {', '.join(PRECISIONS)}")
    if req.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {req.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if req.quant is not None and req.quant not in QUANTS:
        raise ConfigError(f"--quant {req.quant!r} is not one of {', '.join(QUANTS)}")
    if req.quant not in (None, "none") and req.mode not in ("qlora", "infer"):
        raise ConfigError(f"--quant {req.quant} applies to --mode qlora or infer, not {req.mode}")
    if req.mode == "qlora" and req.quant == "none":
        raise ConfigError("--mode qlora needs a 4-bit base: --quant nf4 or nf4-dq (or use --mode lora)")
    if req.dpo_reference not in DPO_REFERENCES:
        raise ConfigError(f"--dpo-reference {req.dpo_reference!r} is not one of {', '.join(DPO_REFERENCES)}")
    if req.lora_rank < 1:
        raise ConfigError(f"--lora-rank {req.lora_rank} must be >= 1 (typical: 8-64)")
    if not 0 <= req.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout {req.lora_dropout} must be in [0, 1)")
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
    policy, every = parse_ac(ac)
    if policy == "none":
        return 0.0
    head = cfg.vocab_size * cfg.dim if cfg.lm_head else 0
    block_matmuls = 2 * (cfg.matmul_params() - head)  # forward matmul FLOPs of all blocks
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # forward scores + PV
    if policy == "full":
        return (block_matmuls + attention) * (cfg.n_layers // every) / cfg.n_layers
    unfused = attention if cfg.attention == "reference" else 0.0
    if policy == "matmuls":  # keeps every matmul and fused-attention output: only pointwise ops rerun
        return unfused
    # selective (torchtitan's op SAC): the second, fourth, ... bias-free projection (aten.mm) of each block reruns
    shapes = projection_shapes(cfg)
    rerun, n_mm = 0, 0
    for name, _width, _kind, bias in _linears(cfg):
        n_mm += not bias
        if not bias and n_mm % 2 == 0:
            i, o = shapes[name]
            rerun += i * o
    return 2 * cfg.n_layers * rerun + unfused


def _training_flops_per_token(cfg: ModelConfig, seq_len: int, frozen_base: bool) -> float:
    """6·N + attention; a frozen base computes no weight gradients: 4·N for its matmuls."""
    full = cfg.flops_per_token(seq_len)
    if not frozen_base:
        return full
    return full - 2 * cfg.matmul_params()


def _frozen(req: PlanRequest) -> Frozen | None:
    if req.mode in ("lora", "qlora") or (req.mode == "dpo" and req.dpo_reference == "adapter"):
        return Frozen(lora_targets=lora_targets(req.lora_targets), lora_rank=req.lora_rank,
                      lora_dropout=req.lora_dropout, saves_inputs=req.mode == "qlora",
                      shared_dropout=req.lora_shared_dropout)
    return None


def _largest_quantized(cfg: ModelConfig, tp: int, with_head: bool) -> float:
    return max(largest_weight_elements(cfg, tp), head_params(cfg) / tp if with_head else 0)


def _quant(req: PlanRequest) -> str:
    if req.mode == "qlora":
        return req.quant if req.quant not in (None, "none") else "nf4-dq"
    if req.mode == "infer":
        return req.quant or "none"
    return "none"


def estimate(req: PlanRequest) -> dict[str, Any]:
    """One plan -> a JSON-able dict (memory per GPU at three allocator levels, fits, FLOPs, time)."""
    base_cfg, name = _resolve_model(req)
    T, shard = validate(req, base_cfg)
    if req.gpu_mem_gb is not None and req.peak_tflops is not None and req.gpu.lower() not in GPUS:
        gpu = GPU(req.gpu, req.gpu_mem_gb, req.peak_tflops, req.peak_tflops)  # a custom accelerator
    else:
        gpu = get_gpu(req.gpu)
    mem_gb = req.gpu_mem_gb if req.gpu_mem_gb is not None else gpu.memory_gb
    tp, B = req.tp, req.micro_batch
    bf16 = req.precision == "bf16"
    a = 2 if bf16 else FP32
    on_gpu = req.device == "cuda"
    mode = req.mode
    cfg = reward_config(base_cfg) if mode == "reward" else base_cfg
    frozen = _frozen(req)
    quant = _quant(req)
    sequences = B * (2 if mode in ("dpo", "reward") else 1)  # chosen + rejected in one forward
    training = mode != "infer"

    # ---- which data-parallel wrapper `lmforge.distributed.apply.parallelize` picks ----------
    if shard > 1:
        wrapper = "hsdp" if req.dp_replicate > 1 else "fsdp"
    elif req.dp_replicate > 1:
        wrapper = "ddp"
    elif on_gpu and bf16 and training and frozen is None:
        wrapper = "fsdp"  # one data-parallel rank: FSDP2 over a size-1 mesh on CUDA (fp32 masters)
    else:
        wrapper = "none"  # frozen weights already in the compute dtype need no gathered copy

    # ---- parameters, gradients, optimizer state -------------------------------------------
    P = cfg.num_params()
    norm_p = _norm_params(cfg)
    state = state_bytes(cfg, mode, req.optimizer, shard=shard, tp=tp, act_bytes=a, norm_params=norm_p,
                        lora_rank=req.lora_rank, lora_target_names=frozen.lora_targets if frozen else frozenset(),
                        quant=quant, dpo_reference=req.dpo_reference, quantize_head=req.quantize_head)
    weights, grads, optimizer = state.weights, state.grads, state.optimizer

    # ---- activations (training) or KV cache and one block's working set (inference) -----------
    layer_p = cfg.layer_params() / tp
    root_p = (P - cfg.n_layers * cfg.layer_params()) / tp  # embeddings, final norm, head
    unsharded = ddp_buckets = kv_cache = 0.0
    logits_bytes = sequences * T * cfg.vocab_size * a if cfg.lm_head else 0.0
    if training:
        acts = estimate_activations(cfg, sequences, T, act_bytes=a, device=req.device, ac=req.ac, tp=tp,
                                    doc_mask=req.doc_mask, frozen=frozen, fp32_logits_held=req.fp32_logits_held)
        saved = acts.saved_bytes
        if wrapper in ("fsdp", "hsdp"):
            # compute copies: the root stays gathered, plus the current and the prefetched block
            unsharded = (root_p + 2 * layer_p) * a
            # a block's unsharded grads (compute dtype, + an fp32 copy for the fp32 reduce-scatter), and
            # the root's (the head's gradient is produced first and reduced last)
            block_grads = 0.0 if frozen else layer_p * (a + (FP32 if bf16 else 0)) + root_p * a
        else:
            block_grads = 0.0 if frozen else FP32 * largest_weight_elements(cfg, tp)  # one at a time
            if wrapper == "ddp" and frozen is None:
                ddp_buckets = state.grads  # flat gradient buckets beside .grad
                if bf16:  # autocast's bf16 weight copies, kept by the matmuls for backward
                    unsharded = (cfg.matmul_params() / tp) * a
        if quant != "none":  # bitsandbytes dequantizes one weight to the compute dtype per matmul
            block_grads += _largest_quantized(cfg, tp, req.quantize_head) * a
        loss_transient = logits_transient_bytes(cfg, sequences, T)
        transient = acts.transient_bytes(loss_transient, block_grad_bytes=block_grads)
        loss_is_peak = loss_transient > 0 and transient == loss_transient
        discarded = acts.recompute_bytes
        per_layer, outside, per_token_layer = acts.layer_bytes, acts.outside_bytes, acts.layer_bytes / (sequences * T)
    else:
        saved = 0.0
        kv_cache = kv_cache_bytes(cfg, B, T, a, tp)
        hidden = cfg.hidden_dim * (3 if cfg.activation == "swiglu" else 2)
        # prefill: one block's forward tensors (input, norm output, q/k/v, attention output, FFN) and
        # the last position's logits in fp32 for sampling
        transient = B * T * (3 * cfg.dim + cfg.q_dim + 2 * cfg.kv_dim + hidden) * a / tp
        transient += B * cfg.vocab_size * (a + FP32) if cfg.lm_head else 0.0
        if quant != "none":
            transient += _largest_quantized(cfg, tp, req.quantize_head) * a
        loss_is_peak, discarded = False, 0.0
        per_layer = outside = per_token_layer = 0.0

    allocated = weights + grads + optimizer + saved + transient + unsharded + ddp_buckets + kv_cache
    stranded = 0.0
    if on_gpu:
        stranded = allocator.stranded_bytes(
            loss_is_peak=loss_is_peak, discarded_block=discarded,
            compute_logits=logits_bytes if req.logits_freed_before_backward else 0.0)
    reserved = allocated + stranded
    outside_alloc = allocator.outside_allocator_bytes(req.gpus, on_gpu)
    device_total = reserved + outside_alloc
    buffers = device_total - (weights + grads + optimizer + saved)

    # ---- FLOPs and time ---------------------------------------------------------------------
    if training:
        per_token = _training_flops_per_token(cfg, T, frozen is not None)
        recompute = _recompute_flops_per_token(cfg, T, req.ac)
        if mode == "dpo" and req.dpo_reference != "precomputed":  # the reference's forward
            per_token += 2 * cfg.matmul_params() + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    else:  # one forward per token, attention over half the context on average
        per_token = 2 * cfg.matmul_params() + 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
        recompute = 0.0
    recompute_factor = (per_token + recompute) / per_token
    tp_eff = 1 - TP_EFFICIENCY_PER_DOUBLING * math.log2(tp)
    quant_eff = QLORA_SPEED if quant != "none" and training else 1.0
    mfu_eff = req.mfu * tp_eff * quant_eff / recompute_factor
    peak_tflops = req.peak_tflops or (gpu.bf16_tflops if bf16 else gpu.tf32_tflops)
    tokens_per_s = req.gpus * peak_tflops * 1e12 * mfu_eff / per_token
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * P
    tokens = req.tokens if req.tokens is not None else chinchilla

    def gb(x: float) -> float:
        return round(x / GB, 3)

    trainable = max(state.trainable_params, 1)
    out: dict[str, Any] = {
        "model": name,
        "mode": mode,
        "params": P,
        "trainable_params": state.trainable_params,
        "params_per_gpu": round(((P - norm_p) / tp + norm_p) / shard),
        "gpus": req.gpus,
        "gpu": req.gpu,
        "gpu_mem_gb": mem_gb,
        "parallel": {"dp_replicate": req.dp_replicate, "dp_shard": shard, "tp": tp, "wrapper": wrapper,
                     "sequence_parallel": tp > 1},
        "seq_len": T,
        "micro_batch": B,
        "sequences_per_micro_batch": sequences,
        "tokens_per_micro_batch": sequences * T * req.dp_replicate * shard,
        "ac": req.ac,
        "precision": req.precision,
        "optimizer": req.optimizer if training else None,
        "quant": quant,
        "doc_mask": req.doc_mask,
        "memory_gb": {"weights": gb(weights), "grads": gb(grads), "optimizer": gb(optimizer),
                      "activations": gb(saved), "buffers": gb(buffers), "total": gb(device_total)},
        "memory_peak_gb": {"allocated": gb(allocated), "reserved": gb(reserved), "device": gb(device_total),
                           "verdict_uses": "device"},
        "memory_detail_gb": {
            "activations_per_layer": gb(per_layer),
            "activations_outside_layers": gb(outside),
            "backward_transient" if training else "forward_transient": gb(transient),
            "unsharded_compute_weights": gb(unsharded),
            "ddp_buckets": gb(ddp_buckets),
            "kv_cache": gb(kv_cache),
            "dpo_reference": gb(state.reference),
            "allocator_stranded": gb(stranded),
            "cuda_context_nccl": gb(outside_alloc),
        },
        "bytes_per_param": {"weights": round(weights / (P / (tp * shard)), 4),
                            "grads": round(grads / (trainable / (tp * shard)), 4) if grads else 0.0,
                            "optimizer": round(optimizer / (trainable / (tp * shard)), 4) if optimizer else 0.0,
                            "total": round((weights + grads + optimizer) / (P / (tp * shard)), 4)},
        "activation_bytes_per_token_per_layer": round(per_token_layer, 1),
        "fits": device_total <= mem_gb * GB,
        "headroom_gb": round(mem_gb - device_total / GB, 3),
        "flops": {"per_token": per_token, "tokens": tokens, "total": per_token * tokens,
                  "recompute_per_token": recompute},
        "chinchilla_tokens": chinchilla,
        "mfu": {"assumed": req.mfu, "effective": round(mfu_eff, 4), "recompute_factor": round(recompute_factor, 4),
                "tp_efficiency": round(tp_eff, 4), "quant_efficiency": round(quant_eff, 4)},
        "peak_tflops": peak_tflops,
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens_per_s_per_gpu": round(tokens_per_s / req.gpus, 1),
        "hours_chinchilla": round(chinchilla / tokens_per_s / 3600, 2),
    }
    if frozen is not None:
        out["lora"] = {"rank": req.lora_rank, "targets": sorted(frozen.lora_targets), "dropout": req.lora_dropout}
    if mode == "dpo":
        out["dpo_reference"] = req.dpo_reference
    if req.tokens is not None:
        hours = req.tokens / tokens_per_s / 3600
        out.update(tokens=req.tokens, hours=round(hours, 2), gpu_hours=round(hours * req.gpus, 1),
                   days=round(hours / 24, 2))
    return out


# Policies `lmforge.distributed.apply.apply_ac` runs, searched by --suggest; ties go to the earlier one
# (less recompute first). layer-N for N above 4 saves little over no AC, so it is not searched.
SUGGEST_AC = ("none", "matmuls", "selective", "layer-4", "layer-3", "layer-2", "full")


def suggest(req: PlanRequest, top: int = 5) -> dict[str, Any]:
    """Search the layout and the mode's options for the fastest plan that fits.

    Searched: tp x dp_shard x AC policy (`SUGGEST_AC`: those the trainer applies) x micro batch; for LoRA also QLoRA (4-bit
    base) and LoRA ranks from the requested one down to 4 (halving). Fastest = highest tokens/s
    (recompute, TP and 4-bit costs); ties go to less checkpointing, the larger LoRA rank, 16-bit over
    4-bit, the larger micro batch (fewer FSDP all-gathers per token), then more memory headroom.
    `req.micro_batch` is the upper bound of the micro-batch search when > 1. Inference searches tp
    and batch only.
    """
    cfg, _ = _resolve_model(req)
    max_mb = req.micro_batch if req.micro_batch > 1 else 64
    micro_batches = [m for m in (1, 2, 4, 8, 16, 32, 64) if m <= max_mb]
    if max_mb not in micro_batches:
        micro_batches.append(max_mb)
    variants = [{}]
    if req.mode in ("lora", "qlora"):
        ranks = [req.lora_rank]
        while ranks[-1] // 2 >= 4:
            ranks.append(ranks[-1] // 2)
        modes = ["lora", "qlora"] if req.mode == "lora" else ["qlora"]
        variants = [{"mode": m, "lora_rank": r} for m in modes for r in ranks]
    ac_list = ("none",) if req.mode == "infer" else SUGGEST_AC
    candidates, best_effort = [], None
    for tp in _divisors(req.gpus):
        if tp > GPUS_PER_NODE or any(v % tp for v in (cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim,
                                                     cfg.dim, cfg.vocab_size)):
            continue
        for shard in _divisors(req.gpus // tp):
            rep = req.gpus // (tp * shard)
            if shard == 1 and rep > 1 and tp > 1:
                continue  # DDP x TP does not compose
            for v_rank, variant in enumerate(variants):
                for ac_rank, ac in enumerate(ac_list):
                    for mb in micro_batches:
                        plan = estimate(replace(req, tp=tp, dp_shard=shard, dp_replicate=rep, ac=ac,
                                                micro_batch=mb, **variant))
                        key = (-plan["tokens_per_s"], ac_rank, v_rank, -mb, -plan["headroom_gb"], tp)
                        if plan["fits"]:
                            candidates.append((key, plan))
                        elif best_effort is None or plan["memory_gb"]["total"] < best_effort["memory_gb"]["total"]:
                            best_effort = plan
                        if not plan["fits"]:
                            break  # a larger micro batch needs more memory still
    if not candidates:
        assert best_effort is not None
        return {**best_effort, "suggested": False, "alternatives": [],
                "note": "no plan fits: the smallest shown; add GPUs, use --mode lora/qlora, "
                        "--optimizer adamw8bit or a shorter --seq-len"}
    candidates.sort(key=lambda kv: kv[0])
    best = candidates[0][1]
    alts = [{"dp_replicate": p["parallel"]["dp_replicate"], "dp_shard": p["parallel"]["dp_shard"],
             "tp": p["parallel"]["tp"], "ac": p["ac"], "micro_batch": p["micro_batch"], "mode": p["mode"],
             "total_gb": p["memory_gb"]["total"], "tokens_per_s": p["tokens_per_s"]}
            for _, p in candidates[1:top + 1]]
    return {**best, "suggested": True, "candidates_that_fit": len(candidates), "alternatives": alts}


__all__ = ["PlanRequest", "estimate", "suggest", "validate"]
