"""Planner modes (LoRA, QLoRA, DPO, reward, inference), optimizers and AC policies, against published or
hand-derived figures, and the frozen-weight activation rules against what autograd really saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError
from lmforge.models.lora import LoraConfig, apply_lora
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.planner.activations import Frozen, estimate_activations
from lmforge.planner.estimate import GB, PlanRequest, estimate, suggest
from lmforge.planner.modes import kv_cache_bytes, lora_params, lora_targets, nf4_bytes_per_param

SMALL = {"n_layers": 2, "dim": 96, "n_heads": 6, "n_kv_heads": 2, "ffn_hidden": 200, "vocab_size": 300,
         "max_seq_len": 128}


def test_lora_trainable_params_as_litgpt_prints_them():
    """litgpt's resource table: r=8 on query and value, 4,194,304 (Llama-2-7B) and 6,553,600 (13B)."""
    qv = lora_targets("wq,wv")
    assert lora_params(get_preset("llama2-7b"), qv, 8) == 4_194_304
    assert lora_params(get_preset("llama2-13b"), qv, 8) == 6_553_600
    p = estimate(PlanRequest("llama2-7b", mode="lora", seq_len=1024))
    assert p["trainable_params"] == 4_194_304 and p["lora"]["targets"] == ["wq", "wv"]


def test_nf4_storage_as_the_qlora_paper_counts_it():
    """Dettmers et al. 2023: 4-bit codes, absmax per 64 = 0.5 extra bits; double quantization 0.127 bits."""
    assert (nf4_bytes_per_param(False) - 0.5) * 8 == pytest.approx(0.5)
    assert (nf4_bytes_per_param(True) - 0.5) * 8 == pytest.approx(0.127, abs=5e-4)


def test_kv_cache_per_token_as_published():
    """Llama-2-7B (MHA) keeps 2 x 32 layers x 4096 x 2 bytes = 512 KiB per token in 16 bits; Llama 3 8B's
    GQA (8 KV heads of 128) a quarter of that, 128 KiB."""
    assert kv_cache_bytes(get_preset("llama2-7b"), 1, 1, 2) == 512 * 1024
    assert kv_cache_bytes(get_preset("llama3-8b"), 1, 1, 2) == 128 * 1024
    p = estimate(PlanRequest("llama2-7b", mode="infer", seq_len=4096, micro_batch=8))
    assert p["memory_detail_gb"]["kv_cache"] == pytest.approx(8 * 4096 * 512 * 1024 / GB, rel=1e-3)
    assert p["memory_gb"]["grads"] == 0 and p["memory_gb"]["optimizer"] == 0 and p["optimizer"] is None
    assert p["memory_gb"]["weights"] == pytest.approx(6_738_415_616 * 2 / GB, rel=1e-3)


def test_selective_policy_keeps_every_other_matmul():
    """torchtitan's op SAC on Llama 3.1 8B keeps, per token per block (bf16): the block input (2d), wq (2d),
    wv (2 x 1024), the flash output (2d) + log-sum-exp (32 heads x 4) , w1 (2 x 14336), w2 (2d) = 63,616 B."""
    cfg = get_preset("llama3.1-8b")
    acts = estimate_activations(cfg, 1, 1024, ac="selective")
    assert acts.layer_bytes / 1024 == 2 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 4096 + 32 * 4 + 2 * 14336 + 2 * 4096
    sizes = {ac: estimate_activations(cfg, 1, 1024, ac=ac).saved_bytes
             for ac in ("none", "layer-2", "matmuls", "selective", "full")}
    assert sizes["none"] > sizes["matmuls"] > sizes["selective"] > sizes["full"]
    assert sizes["none"] > sizes["layer-2"] > sizes["full"]
    # layer-2: half the blocks keep everything, half only their input
    half = estimate_activations(cfg, 1, 1024, ac="layer-2")
    assert half.saved_bytes == pytest.approx(16 * half.layer_full_bytes + 16 * 2 * 4096 * 1024 + half.outside_bytes)


def test_frozen_llama2_block_by_hand():
    """A LoRA block of Llama-2-7B as litgpt runs it (bf16, fp32 norm inputs, one dropout for q and v):
    2 norms x (4d + 4), dropout mask + dropped input 3d, two r=8 intermediates, q k v out 8d + lse 128,
    SwiGLU's three h-wide tensors (w2's input is not kept: w2 is frozen)."""
    d, h = 4096, 11008
    frozen = Frozen(lora_targets=lora_targets("wq,wv"), lora_rank=8, lora_dropout=0.05, shared_dropout=True)
    acts = estimate_activations(get_preset("llama2-7b"), 1, 100, frozen=frozen)
    assert acts.layer_bytes / 100 == 2 * (4 * d + 4) + 3 * d + 2 * 8 * 2 + 8 * d + 32 * 4 + 3 * 2 * h
    qlora = estimate_activations(get_preset("llama2-7b"), 1, 100, frozen=Frozen(lora_targets=frozen.lora_targets,
                                                                                   saves_inputs=True))
    full = estimate_activations(get_preset("llama2-7b"), 1, 100)
    assert acts.layer_bytes < qlora.layer_bytes  # 4-bit matmuls keep their inputs: full training + adapters
    assert qlora.layer_bytes == full.layer_bytes + 2 * 8 * 2 * 100


def _saved_bytes_with_lora(cfg, lora: LoraConfig, T: int) -> int:
    model = build_model(cfg, seed=0)
    model.train()
    apply_lora(model, lora)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    targets = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(tokens).flatten(0, 1).float(), targets.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("targets, dropout", [("wq,wv", 0.0), ("all-linear", 0.0), ("wq,wv", 0.1),
                                              ("attention", 0.1)])
def test_frozen_rules_match_autograd_on_a_real_lora_model(targets, dropout):
    """The real lmforge Transformer with `apply_lora` on CPU (fp32): the planner's frozen-base activations
    agree with the unique storages autograd saves (to within the loss scalar and the targets)."""
    torch.manual_seed(0)
    cfg = get_preset("tiny", **SMALL)
    T = 40
    measured = _saved_bytes_with_lora(cfg, LoraConfig(rank=4, dropout=dropout, targets=targets.split(",")), T)
    frozen = Frozen(lora_targets=lora_targets(targets), lora_rank=4, lora_dropout=dropout)
    est = estimate_activations(cfg, 2, T, act_bytes=4, device="cpu", frozen=frozen).saved_bytes
    assert abs(est - measured) / measured < 0.02, (est, measured)
    everything = estimate_activations(cfg, 2, T, act_bytes=4, device="cpu").saved_bytes
    assert est < everything


def test_optimizers_and_modes_state():
    base = PlanRequest("llama2-7b", gpus=8, seq_len=2048)
    adam = estimate(base)
    muon = estimate(PlanRequest("llama2-7b", gpus=8, seq_len=2048, optimizer="muon"))
    p = 6_738_415_616
    matrices = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    # Muon: one fp32 momentum per block-matrix weight, AdamW's two for embeddings, head and norms
    assert muon["memory_gb"]["optimizer"] == pytest.approx((4 * matrices + 8 * (p - matrices)) / 8 / GB, rel=1e-3)
    assert muon["memory_gb"]["optimizer"] < adam["memory_gb"]["optimizer"]
    # DPO with a frozen reference copy: + 2 bytes per parameter (bf16, sharded), and two sequences
    dpo = estimate(PlanRequest("llama2-7b", gpus=8, seq_len=2048, mode="dpo"))
    assert dpo["memory_detail_gb"]["dpo_reference"] == pytest.approx(p * 2 / 8 / GB, rel=1e-3)
    assert dpo["sequences_per_micro_batch"] == 2
    assert dpo["memory_gb"]["activations"] == pytest.approx(2 * adam["memory_gb"]["activations"], rel=1e-3)
    pre = estimate(PlanRequest("llama2-7b", gpus=8, seq_len=2048, mode="dpo", dpo_reference="precomputed"))
    assert pre["memory_gb"]["total"] < dpo["memory_gb"]["total"] and pre["tokens_per_s"] > dpo["tokens_per_s"]
    ada = estimate(PlanRequest("llama2-7b", gpus=8, seq_len=2048, mode="dpo", dpo_reference="adapter"))
    assert ada["trainable_params"] == 4_194_304 and ada["memory_detail_gb"]["dpo_reference"] == 0
    # reward model: no LM head (no vocabulary-sized logits), pairs of sequences
    rm = estimate(PlanRequest("llama2-7b", gpus=8, seq_len=2048, mode="reward"))
    assert rm["params"] == p - 32000 * 4096 and rm["sequences_per_micro_batch"] == 2
    assert rm["memory_gb"]["activations"] < dpo["memory_gb"]["activations"]
    # LoRA: a frozen bf16 base (2 bytes/param), no full gradients; QLoRA: ~0.52 bytes for the projections
    lora = estimate(PlanRequest("llama2-7b", mode="lora", seq_len=2048))
    qlora = estimate(PlanRequest("llama2-7b", mode="qlora", seq_len=2048))
    assert lora["memory_gb"]["weights"] == pytest.approx((p * 2 + 4_194_304 * 4) / GB, rel=1e-3)
    assert qlora["memory_gb"]["weights"] < 0.3 * lora["memory_gb"]["weights"]
    assert qlora["memory_gb"]["activations"] > lora["memory_gb"]["activations"]  # 4-bit matmuls keep inputs
    assert lora["flops"]["per_token"] < adam["flops"]["per_token"]  # no weight gradients for the base


def test_suggest_searches_mode_options():
    # a 13B LoRA on one 24 GB card: 16-bit weights alone (26 GB) do not fit, the search finds QLoRA
    s = suggest(PlanRequest("llama2-13b", mode="lora", gpu="4090", seq_len=2048))
    assert s["suggested"] and s["mode"] == "qlora" and s["fits"] and s["lora"]["rank"] == 8
    # roomy: 16-bit LoRA wins over 4-bit (faster), without checkpointing
    r = suggest(PlanRequest("llama2-7b", mode="lora", gpu="h100", seq_len=1024, micro_batch=4))
    assert r["mode"] == "lora" and r["ac"] == "none" and r["micro_batch"] == 4
    # the torchtitan configuration with room to spare is found among the AC policies
    t = suggest(PlanRequest("llama3.1-8b", gpus=8, gpu="h100", gpu_mem_gb=96, seq_len=8192, micro_batch=2))
    assert t["suggested"] and t["fits"]


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "sft"}, "--mode"),
    ({"ac": "layer-0"}, "layer-N"),
    ({"ac": "partial"}, "selective, matmuls, layer-N"),
    ({"ac": "titan-op"}, "selective, matmuls, layer-N"),
    ({"optimizer": "sgd"}, "--optimizer"),
    ({"mode": "lora", "lora_targets": "wz"}, "unknown 'wz'"),
    ({"mode": "full", "quant": "nf4"}, "--quant nf4 applies"),
    ({"mode": "qlora", "quant": "none"}, "4-bit base"),
    ({"mode": "dpo", "dpo_reference": "copy"}, "--dpo-reference"),
    ({"mode": "lora", "lora_rank": 0}, "--lora-rank"),
])
def test_bad_mode_options_name_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        estimate(PlanRequest("llama2-7b", **kwargs))
