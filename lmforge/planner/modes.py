"""Training modes and optimizers: which weights train, how every weight is stored, what the optimizer keeps.

Per parameter, on one rank (after sharding):

    mode        weights                                   grads            optimizer state
    pretrain    fp32 master                               fp32             per optimizer
    full        fp32 master                               fp32             per optimizer
    lora        frozen base in the compute dtype,         adapters, fp32   adapters only
                + fp32 adapters A (r x in), B (out x r)
    qlora       projection weights (every block linear; the LM head too with `quantize_head`) in NF4
                as bitsandbytes stores them: 4-bit codes (0.5 B) + one absmax per 64-value block, fp32 (4/64 B), or with
                double quantization 8-bit absmax + one fp32 scale per 256 of them (1/64 + 4/16384 B);
                embeddings and norms in the compute dtype; adapters as lora
    dpo         the policy (full, or lora when the reference is the adapter-free base), plus the
                reference: a frozen compute-dtype copy ('model'), nothing ('adapter': the base with
                adapters off; 'precomputed': log-probs computed beforehand); chosen + rejected = 2 sequences
    reward      full training of the backbone with a scalar head instead of the LM head; 2 sequences
    infer       weights in the compute dtype (or NF4), KV cache, no gradients or optimizer

Optimizer state per trained parameter: AdamW fp32 m and v (8 B); 8-bit AdamW (bitsandbytes blockwise:
two uint8 states + one fp32 absmax per 2048 values each, 2.004 B); Muon (Jordan et al. 2024): one fp32
momentum (4 B) for the 2-D block matrices, AdamW (8 B) for embeddings, head, norms and biases, as
Muon's reference setup prescribes. LoRA adapters (fp32 master and gradient) use AdamW or 8-bit AdamW as asked;
with `--optimizer muon` they use AdamW (Muon's rule is for the full 2-D weight matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.models.config import ModelConfig

MODES = ("pretrain", "full", "lora", "qlora", "dpo", "reward", "infer")
DPO_REFERENCES = ("model", "adapter", "precomputed")
QUANTS = ("none", "nf4", "nf4-dq")
OPTIMIZERS = ("adamw", "adamw8bit", "muon")
FP32 = 4
ADAMW_BYTES = 2 * FP32
ADAMW8BIT_BYTES = 2.0 + 2 * FP32 / 2048
MUON_MATRIX_BYTES = FP32  # one momentum buffer
NF4_BLOCK = 64  # values per absmax (bitsandbytes' default blocksize for 4-bit)
NF4_DQ_BLOCK = 256  # absmax values per second-level fp32 scale


def nf4_bytes_per_param(double_quant: bool) -> float:
    """Bytes bitsandbytes stores per 4-bit weight: 4-bit code + its share of the block scales."""
    if double_quant:
        return 0.5 + 1 / NF4_BLOCK + FP32 / (NF4_BLOCK * NF4_DQ_BLOCK)
    return 0.5 + FP32 / NF4_BLOCK


LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def lora_targets(spec: str) -> frozenset:
    """'wq,wv' | 'attention' | 'mlp' | 'all-linear' -> projection names (as `lmforge.models.lora`)."""
    names: set[str] = set()
    for t in (x.strip() for x in spec.split(",") if x.strip()):
        if t == "all-linear":
            names |= set(LORA_PROJECTIONS)
        elif t == "attention":
            names |= {"wq", "wk", "wv", "wo"}
        elif t == "mlp":
            names |= {"w1", "w2", "w3"}
        elif t in LORA_PROJECTIONS:
            names.add(t)
        else:
            raise ValueError(f"--lora-targets has unknown '{t}'; use {', '.join(LORA_PROJECTIONS)}, "
                             "attention, mlp or all-linear")
    if not names:
        raise ValueError("--lora-targets is empty; e.g. wq,wv")
    return frozenset(names)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each block projection."""
    shapes = {"wq": (cfg.dim, cfg.q_dim), "wk": (cfg.dim, cfg.kv_dim), "wv": (cfg.dim, cfg.kv_dim),
              "wo": (cfg.q_dim, cfg.dim), "w1": (cfg.dim, cfg.hidden_dim), "w2": (cfg.hidden_dim, cfg.dim)}
    if cfg.activation == "swiglu":
        shapes["w3"] = (cfg.dim, cfg.hidden_dim)
    return shapes


def lora_params(cfg: ModelConfig, targets: frozenset, rank: int) -> int:
    """Adapter parameters: r x (in + out) per adapted projection per block."""
    shapes = projection_shapes(cfg)
    return cfg.n_layers * sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)


def block_matrix_params(cfg: ModelConfig) -> int:
    """Parameters of the 2-D projection weights of all blocks (Muon's matrices, NF4's targets)."""
    return cfg.n_layers * sum(i * o for i, o in projection_shapes(cfg).values())


def head_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.dim if cfg.lm_head and not cfg.tie_embeddings else 0


def optimizer_bytes(optimizer: str, trainable: float, matrices: float) -> float:
    """Optimizer state bytes for `trainable` parameters, `matrices` of which are 2-D block weights."""
    if optimizer == "adamw":
        return trainable * ADAMW_BYTES
    if optimizer == "adamw8bit":
        return trainable * ADAMW8BIT_BYTES
    if optimizer == "muon":
        return matrices * MUON_MATRIX_BYTES + (trainable - matrices) * ADAMW_BYTES
    raise ValueError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


@dataclass
class State:
    """Bytes on one rank that do not depend on the batch."""

    weights: float  # trained masters + frozen weights (+ a DPO reference)
    grads: float
    optimizer: float
    trainable_params: int
    reference: float = 0.0  # part of `weights`: a frozen DPO reference copy


def state_bytes(cfg: ModelConfig, mode: str, optimizer: str, *, shard: int, tp: int, act_bytes: int,
                norm_params: int, lora_rank: int = 8, lora_target_names: frozenset = frozenset(),
                quant: str = "none", dpo_reference: str = "model", quantize_head: bool = False) -> State:
    """Weights, gradients and optimizer state per rank (FSDP2 shards over `shard`, TP splits by `tp`
    except the norm weights, which TP replicates)."""
    P = cfg.num_params()

    def per_rank(n: float, norms: float = 0.0) -> float:
        return ((n - norms) / tp + norms) / shard

    matrices = block_matrix_params(cfg)
    if mode == "infer":
        return State(weights=per_rank(_stored_bytes(cfg, quant, act_bytes, quantize_head), norm_params * act_bytes),
                     grads=0.0, optimizer=0.0, trainable_params=0)
    if mode in ("lora", "qlora") or (mode == "dpo" and dpo_reference == "adapter"):
        n_lora = lora_params(cfg, lora_target_names, lora_rank)
        base = _stored_bytes(cfg, quant if mode == "qlora" else "none", act_bytes, quantize_head)
        trained = per_rank(n_lora)
        return State(weights=per_rank(base, norm_params * act_bytes) + trained * FP32, grads=trained * FP32,
                     optimizer=optimizer_bytes("adamw" if optimizer == "muon" else optimizer, trained, 0.0),
                     trainable_params=n_lora)
    # every weight trains: fp32 masters and gradients (pretrain, full, dpo with a full policy, reward)
    trained = per_rank(P, norm_params)
    state = State(weights=trained * FP32, grads=trained * FP32,
                  optimizer=optimizer_bytes(optimizer, trained, per_rank(matrices)), trainable_params=P)
    if mode == "dpo" and dpo_reference == "model":
        state.reference = per_rank(P, norm_params) * act_bytes
        state.weights += state.reference
    return state


def _stored_bytes(cfg: ModelConfig, quant: str, act_bytes: int, quantize_head: bool = False) -> float:
    """Bytes of all frozen weights: compute dtype, or NF4 for the projections (and the head)."""
    P = cfg.num_params()
    if quant == "none":
        return P * act_bytes
    quantized = block_matrix_params(cfg) + (head_params(cfg) if quantize_head else 0)
    return quantized * nf4_bytes_per_param(quant == "nf4-dq") + (P - quantized) * act_bytes


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq_len: int, act_bytes: int, tp: int = 1) -> float:
    """K and V for every layer, token and sequence, in the compute dtype (GQA: kv_dim = n_kv_heads x head_dim)."""
    return 2 * cfg.n_layers * batch * seq_len * cfg.kv_dim * act_bytes / tp


def reward_config(cfg: ModelConfig) -> ModelConfig:
    """The reward model: the same backbone, a scalar head instead of the LM head."""
    from dataclasses import replace

    return replace(cfg, lm_head=False, tie_embeddings=False)


__all__ = [
    "DPO_REFERENCES",
    "MODES",
    "OPTIMIZERS",
    "QUANTS",
    "State",
    "kv_cache_bytes",
    "lora_params",
    "lora_targets",
    "nf4_bytes_per_param",
    "reward_config",
    "state_bytes",
]
