"""Activation memory: the bytes autograd keeps from the forward pass until the backward pass.

The model is built tensor by tensor from what `lmforge.models.transformer` actually saves, not from a
rule of thumb. For one micro batch of B sequences of T tokens, every block saves (elements per token):

    pre-norm block (Llama)                     saved by
    x (block input)          d (fp32)          attention_norm (RMSNorm/LayerNorm; see `norm` below)
    norm statistics          1-2 (fp32)        rstd (RMSNorm), mean+rstd (LayerNorm)
    x * rstd                 d (fp32)          only composite RMSNorm (CPU); the fused CUDA kernel not
    norm output              d                 wq/wk/wv (their shared input)
    q, k, v                  q_dim+2*kv_dim    fused attention (flash / efficient)
    attention output         q_dim             fused attention, and wo (same storage)
    log-sum-exp              n_heads (fp32)    fused attention
    h (residual), stats,...  as above          ffn_norm
    FFN                      4*hidden (SwiGLU: w1 out, w3 out, silu out, product), 2*hidden (GELU), hidden (ReLU)

plus dropout masks when dropout > 0, and the T x T attention probabilities when attention does not
run as a fused kernel (the `reference` attention, or SDPA's math fallback, which PyTorch uses on CPU
when attention dropout is on). Outside the blocks: token ids, RoPE cos/sin, the final norm, the
head's input, the fp32 log-probabilities the cross-entropy keeps (`lmforge.train.trainer` upcasts the
logits) and the targets.

Tensor parallelism (torchtitan's plan, sequence parallel on): norms and residuals are split along the
sequence, heads and FFN width split by `tp`, while the all-gathered input of the column-parallel
projections is held at full size on every rank.

Activation checkpointing policies (`AC_POLICIES`, the names `parallel.activation_checkpoint` takes and
`lmforge.distributed.apply.apply_ac` runs; a policy checkpoints per block):
  * ``full``      each block keeps only its input; its activations are rebuilt during backward.
  * ``selective`` torchtitan's op-level selective AC (``selective_ac_option = "op"``): the block input plus
    the outputs of the save-list ops (matmuls, the fused attention kernel, reduce-scatter), except that
    every second ``mm`` of a block is recomputed (Llama: wq, wv, w1 and w2 kept; wk, wo, w3 not; a
    projection with a bias runs as ``addmm``, which is kept and not counted).
  * ``matmuls``   the same save list with every matmul kept: the block input plus the outputs of every
    projection (and the attention matmuls when attention is not a fused kernel) and of the fused
    attention kernel (output + log-sum-exp); norms, RoPE, activations and products are recomputed.
  * ``layer-N``   torchtitan's layer-level selective AC (``selective_ac_option = "N"``): blocks N, 2N, ...
    (counted from 1) are fully checkpointed, the others keep everything.

Frozen weights (LoRA, QLoRA, the frozen part of DPO): autograd saves a matmul's input only when the
weight needs a gradient, so a frozen projection keeps nothing, and SwiGLU's product (w2's input) is
dropped; a LoRA adapter keeps its (dropped-out) input, the dropout mask and its rank-r intermediate.
bitsandbytes' 4-bit matmul (QLoRA) saves its input whenever the input needs a gradient, so a 4-bit
base keeps every projection input as full training does.

Besides what is saved, the peak adds the backward transients: the fp32 gradients of the logits in
the loss backward, or (whichever is larger) one block's backward: its recomputed activations when
checkpointed, the gradients in flight and the block's weight gradients.

This module imports no torch: it is arithmetic on the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.models.config import ModelConfig

AC_MODES = ("none", "full", "selective", "matmuls")  # applied by `lmforge.distributed.apply.apply_ac`
AC_POLICIES = AC_MODES + ("layer-N",)  # layer-N: N a positive integer, e.g. layer-2 (also applied)
DEVICES = ("cuda", "cpu")
FP32 = 4
INT64 = 8
_FREED_BEFORE_BLOCKS = ("loss.log_probs_fp32", "head_input")  # and the final norm's tensors


@dataclass(frozen=True)
class Term:
    """One saved tensor (or a group of identical ones) of one micro batch on one rank."""

    name: str
    bytes: float


def parse_ac(ac: str) -> tuple[str, int]:
    """'none'|'full'|'selective'|'matmuls'|'layer-N' -> (policy, every N-th block checkpointed).

    The same names and rule as `lmforge.distributed.config.parse_ac_policy` (kept apart so the planner
    imports no distributed code; a test holds the two to the same answers)."""
    if ac in AC_MODES:
        return ac, 1
    if ac.startswith("layer-") and ac[6:].isascii() and ac[6:].isdigit() and int(ac[6:]) > 0:
        return "full", int(ac[6:])
    raise ValueError(f"ac={ac!r} is not one of none, full, selective, matmuls, layer-N (N >= 1, e.g. layer-2)")


@dataclass(frozen=True)
class Frozen:
    """Which weights train. `lora_targets`: projection names with an adapter (rank `lora_rank`,
    dropout `lora_dropout` applied per adapter as `lmforge.models.lora.LoRALinear` does);
    `saves_inputs`: the frozen matmul saves its input anyway (bitsandbytes 4-bit); `shared_dropout`:
    adapters on one input share a single dropout (litgpt's fused q/k/v adapter), not one each."""

    lora_targets: frozenset = frozenset()
    lora_rank: int = 8
    lora_dropout: float = 0.0
    saves_inputs: bool = False
    shared_dropout: bool = False


@dataclass
class Activations:
    """Bytes held for backward by one micro batch on one rank."""

    per_layer: list[Term] = field(default_factory=list)  # one block, as saved with the chosen AC
    layer_full: list[Term] = field(default_factory=list)  # one block without AC (rebuilt during backward)
    outside: list[Term] = field(default_factory=list)  # embeddings, RoPE tables, final norm, head, loss
    n_layers: int = 0
    ac: str = "none"
    backward_working: float = 0.0  # gradients alive inside one block's backward
    n_checkpointed: int | None = None  # blocks under the policy (layer-N: every N-th); None: all

    @property
    def checkpointed(self) -> int:
        return self.n_layers if self.n_checkpointed is None else self.n_checkpointed

    @property
    def layer_bytes(self) -> float:
        return sum(t.bytes for t in self.per_layer)

    @property
    def layer_full_bytes(self) -> float:
        return sum(t.bytes for t in self.layer_full)

    @property
    def outside_bytes(self) -> float:
        return sum(t.bytes for t in self.outside)

    @property
    def saved_bytes(self) -> float:
        """What the forward pass leaves for backward (the figure the autograd test measures)."""
        plain = self.n_layers - self.checkpointed
        return self.checkpointed * self.layer_bytes + plain * self.layer_full_bytes + self.outside_bytes

    @property
    def recompute_bytes(self) -> float:
        """Extra bytes alive while a checkpointed block is recomputed in backward (one block at a time).

        Backward runs the last block first, when the most is still saved; under layer-N a block below it
        is recomputed only after the blocks above have released theirs, so the recompute adds to the
        peak only when the last block is checkpointed (N divides the number of blocks)."""
        policy, every = parse_ac(self.ac)
        if policy == "none" or self.n_layers % every:
            return 0.0
        return max(self.layer_full_bytes - self.layer_bytes, 0.0)

    def transient_bytes(self, logits_bytes: float, block_grad_bytes: float = 0.0) -> float:
        """Peak bytes above `saved_bytes` during backward: the larger of the loss backward (fp32
        gradients of the logits) and one block's backward (its recomputed activations, when
        checkpointed, plus the gradients in flight), by when the loss, the head and the final norm have
        released what they kept. `block_grad_bytes`: weight gradients alive during a block's backward
        (one matrix at a time without FSDP; the whole unsharded block with FSDP until its reduce-scatter)."""
        freed = sum(t.bytes for t in self.outside if t.name in _FREED_BEFORE_BLOCKS or t.name.startswith("norm."))
        block = self.recompute_bytes + self.backward_working + block_grad_bytes - freed
        return max(logits_bytes, block, 0.0)


def attention_path(cfg: ModelConfig, device: str) -> str:
    """Which attention implementation runs in training: 'fused', 'math' (SDPA fallback) or 'reference'.

    On CUDA, SDPA's flash / memory-efficient kernels handle causal attention with dropout. On CPU,
    PyTorch's fused CPU kernel has no dropout, so SDPA falls back to the math path when dropout > 0.
    """
    if cfg.attention == "reference":
        return "reference"
    if device == "cpu" and cfg.dropout > 0:
        return "math"
    return "fused"


def _linears(cfg: ModelConfig) -> list[tuple[str, int, int, bool]]:
    """(name, out features, tp split kind, has bias) for a block's projections, in call order."""
    qkv_bias = cfg.bias or cfg.qkv_bias
    out = [("wq", cfg.q_dim, "heads", qkv_bias), ("wk", cfg.kv_dim, "heads", qkv_bias),
           ("wv", cfg.kv_dim, "heads", qkv_bias), ("wo", cfg.dim, "partial", cfg.bias),
           ("w1", cfg.hidden_dim, "heads", cfg.bias)]
    if cfg.activation == "swiglu":
        out.append(("w3", cfg.hidden_dim, "heads", cfg.bias))
    out.append(("w2", cfg.dim, "partial", cfg.bias))
    return out


def estimate_activations(cfg: ModelConfig, batch: int, seq_len: int, *, act_bytes: int = 2,
                         device: str = "cuda", ac: str = "none", tp: int = 1,
                         doc_mask: bool = False, frozen: Frozen | None = None,
                         fp32_logits_held: bool = False) -> Activations:
    """Saved-activation bytes for one micro batch of `batch` x `seq_len` tokens on one rank.

    `doc_mask`: an explicit (B, 1, T, T) attention mask (packed documents attend only within
    themselves); attention then keeps it as an additive bias in the compute dtype in every block.
    `frozen`: the base weights are frozen (LoRA / QLoRA), see `Frozen`; None: every weight trains.
    `fp32_logits_held`: the training loop holds fp32 logits through backward (Lightning Fabric's
    bf16-true converts the model's output to fp32, and litgpt keeps the result until backward ends)."""
    policy, every = parse_ac(ac)
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {DEVICES}")
    B, T, a = batch, seq_len, act_bytes
    N = B * T  # tokens in the micro batch
    d, H, hd = cfg.dim, cfg.n_heads, cfg.head_dim
    mask_bytes = a if device == "cpu" else 1  # CPU dropout keeps a float noise tensor, CUDA a bool mask
    p = cfg.dropout > 0
    path = attention_path(cfg, device)

    def seq(n: float) -> float:  # split along the sequence by sequence parallel
        return n / tp

    def heads(n: float) -> float:  # split across heads / FFN width by tensor parallel
        return n / tp

    def norm(prefix: str) -> list[Term]:
        """What a norm keeps besides its output (which the next op saves): input and statistics.

        RMSNorm computes in fp32 in every case that matters here: PyTorch's composite RMSNorm (CPU)
        upcasts to fp32 itself, and on CUDA autocast (which the trainer enables for bf16) lists
        rms_norm and layer_norm as fp32 ops, so the norm keeps an fp32 copy of its input; the
        output is cast back to the compute dtype for the next matmul. CPU autocast runs LayerNorm
        in the compute dtype."""
        if cfg.norm == "layernorm":
            nb = FP32 if device == "cuda" else a
            return [Term(f"{prefix}.input", seq(N * d * nb)), Term(f"{prefix}.mean_rstd", seq(N * 2 * nb))]
        terms = [Term(f"{prefix}.input", seq(N * d * FP32)), Term(f"{prefix}.rstd", seq(N * FP32))]
        if device == "cpu" and frozen is None:  # composite RMSNorm also keeps x * rstd (weight's gradient)
            terms.append(Term(f"{prefix}.x_rstd", seq(N * d * FP32)))
        return terms  # the fused CUDA kernel keeps input and rstd only

    def attention_core() -> list[Term]:
        q_el, kv_el = N * cfg.q_dim, N * cfg.kv_dim
        bias = [Term("attn.mask_bias", N * T * a)] if doc_mask and path != "reference" else []
        if doc_mask and path == "reference":
            bias = [Term("attn.mask", N * T)]  # bool mask & causal, kept by masked_fill
        if path == "fused":
            return bias + [Term("attn.q", heads(q_el * a)), Term("attn.k", heads(kv_el * a)),
                    Term("attn.v", heads(kv_el * a)), Term("attn.out", heads(q_el * a)),
                    Term("attn.logsumexp", heads(N * H * FP32))]
        probs = N * H * T  # (B, H, T, T)
        full_heads = N * H * hd  # k and v expanded to every query head
        ab = a
        if path == "math" and device == "cpu":  # SDPA's math path upcasts bf16/fp16 to fp32 on CPU
            ab = FP32
        terms = bias + [Term("attn.q", heads(q_el * ab)), Term("attn.k_expanded", heads(full_heads * ab)),
                        Term("attn.v_expanded", heads(full_heads * ab))]
        if path == "reference":
            # softmax runs in fp32; the cast back to the compute dtype is a second copy unless fp32
            terms.append(Term("attn.probs", heads(probs * (FP32 + (a if a != FP32 else 0)))))
            if cfg.causal and not doc_mask:
                terms.append(Term("attn.causal_mask", T * T))  # bool (T, T), one per block
        else:
            terms.append(Term("attn.probs", heads(probs * ab)))
        if p:
            terms += [Term("attn.dropout_mask", heads(probs * (ab if device == "cpu" else mask_bytes))),
                      Term("attn.probs_dropped", heads(probs * ab))]
        terms.append(Term("attn.out", heads(q_el * a)))  # re-laid-out copy, the input of wo
        return terms

    keeps_inputs = frozen is None or frozen.saves_inputs  # every projection saves its input

    def adapters(names: tuple[str, ...], width_in: float, shared_input_kept: bool) -> list[Term]:
        """What LoRA adapters on `names` (sharing one input of `width_in` per token) keep."""
        if frozen is None:
            return []
        hit = [n for n in names if n in frozen.lora_targets]
        if not hit:
            return []
        terms = [Term(f"lora.{n}.a_out", N * frozen.lora_rank * a) for n in hit]  # kept by B
        if frozen.lora_dropout > 0:  # each adapter: its own mask and dropped-out input (kept by A)
            terms += [Term(f"lora.{n}.dropout", N * width_in * (a + mask_bytes))
                      for n in (hit[:1] if frozen.shared_dropout else hit)]
        elif not shared_input_kept:  # A keeps the shared input itself
            terms.append(Term(f"lora.{hit[0]}.input", N * width_in * a))
        return terms

    def ffn_core() -> list[Term]:
        h = N * cfg.hidden_dim
        w2_in = [Term("ffn.w2_in", heads(h * a))] if keeps_inputs else []
        w2_in += adapters(("w2",), heads(cfg.hidden_dim), bool(w2_in))
        if cfg.activation == "swiglu":  # w1 out, w3 out, silu(w1 out), their product (w2 input)
            return [Term("ffn.w1_out", heads(h * a)), Term("ffn.w3_out", heads(h * a)),
                    Term("ffn.silu_out", heads(h * a))] + w2_in
        if cfg.activation == "relu":  # relu keeps its output, which is also w2's input
            return [Term("ffn.relu_out", heads(h * a))]
        return [Term("ffn.w1_out", heads(h * a))] + w2_in

    dropout = [Term("dropout_mask", seq(N * d * mask_bytes))] if p else []

    def proj_in(prefix: str, names: tuple[str, ...]) -> list[Term]:
        """The all-gathered input of the column-parallel projections, kept once for all of them."""
        kept = [Term(prefix + ".proj_input", N * d * a)] if keeps_inputs else []
        return kept + adapters(names, d, bool(kept))

    attn_in, ffn_in = proj_in("attention", ("wq", "wk", "wv")), proj_in("feed_forward", ("w1", "w3"))
    wo_adapter = adapters(("wo",), heads(cfg.q_dim), True)  # wo's input is the kept attention output
    if cfg.norm_position == "pre":
        full = (norm("attention_norm") + attn_in + attention_core() + wo_adapter + dropout
                + norm("ffn_norm") + ffn_in + ffn_core() + dropout)
    else:  # post-norm: the block input feeds attention directly, norms sit on the residual sums
        full = (attn_in + attention_core() + wo_adapter + dropout
                + norm("attention_norm") + ffn_in + ffn_core() + dropout + norm("ffn_norm"))
        # The post-norm block input is the previous norm's output, held by the projections; the block
        # output is counted by the next block (or as the head input).

    block_input = Term("block_input", seq(N * d * a))
    n_checkpointed = None
    if policy == "none":
        per_layer = full
    elif policy == "full":
        per_layer = [block_input]
        if every > 1:  # layer-N: blocks N, 2N, ... are checkpointed, the rest keep everything
            n_checkpointed = cfg.n_layers // every
    else:  # matmuls / selective: matmul outputs (projections, and attention matmuls when not fused)
        per_layer = [block_input]
        n_mm = 0

        def matmul_out(term: Term, is_mm: bool = True) -> None:
            # torchtitan's op SAC recomputes every second aten.mm; a projection with a bias runs as addmm,
            # which is always kept and not counted
            nonlocal n_mm
            n_mm += is_mm
            if not (policy == "selective" and is_mm and n_mm % 2 == 0):
                per_layer.append(term)

        for name, width, kind, bias in _linears(cfg):
            el = N * width
            out_bytes = heads(el * a) if kind == "heads" else el * a
            matmul_out(Term(f"{name}.out", out_bytes), is_mm=not bias)  # kept even when the weight is frozen
            if frozen is not None and name in frozen.lora_targets:  # LoRALinear: x @ A^T, then @ B^T (two mm)
                matmul_out(Term(f"lora.{name}.a_out", N * frozen.lora_rank * a))
                matmul_out(Term(f"lora.{name}.b_out", out_bytes))
        if path == "fused":
            per_layer += [Term("attn.out", heads(N * cfg.q_dim * a)),
                          Term("attn.logsumexp", heads(N * H * FP32))]
        else:  # bmm outputs: the scores Q K^T and the attention output P V
            per_layer += [Term("attn.scores", heads(N * H * T * a)), Term("attn.out", heads(N * cfg.q_dim * a))]
        if tp > 1:  # the two reduce-scatter outputs of a sequence-parallel block
            per_layer.append(Term("reduce_scatter.out", 2 * seq(N * d * a)))

    outside = [Term("token_ids", N * INT64)]
    if cfg.pos_encoding == "learned":
        outside.append(Term("position_ids", T * INT64))
    if cfg.type_vocab_size:
        outside.append(Term("token_type_ids", N * INT64))
    if cfg.embedding_norm:
        outside += norm("embedding_norm")
    if p:
        outside.append(Term("embedding.dropout_mask", seq(N * d * mask_bytes)))
    if cfg.pos_encoding == "rope":
        outside.append(Term("rope.cos_sin", 2 * N * hd * a))
    if cfg.final_norm:
        outside += norm("norm")
    if keeps_inputs or not cfg.lm_head:  # final hidden states, kept by the LM head / task head
        outside.append(Term("head_input", N * d * a))
    if frozen is not None and cfg.norm_position == "pre" and (policy == "none" or every > 1):
        # (only when the first block is not checkpointed: a checkpointed block keeps its input regardless)
        # The frozen embeddings' output needs no gradient: the first block's attention norm keeps nothing,
        # nor do the dropout masks of its q/k/v adapters (their input needs no gradient). With no q/k/v
        # adapter, more of the first block keeps nothing; that part is not subtracted (an overestimate).
        not_kept = sum(t.bytes for t in norm("attention_norm"))
        qkv = [n for n in ("wq", "wk", "wv") if n in frozen.lora_targets]
        if frozen.lora_dropout > 0 and qkv:
            not_kept += (1 if frozen.shared_dropout else len(qkv)) * N * d * mask_bytes
        outside.append(Term("first_block.not_kept", -not_kept))
    if cfg.lm_head:
        # the TP head gathers the logits (output_layouts=Replicate()), so every rank holds all of them
        outside += [Term("loss.log_probs_fp32", N * cfg.vocab_size * FP32),
                    Term("loss.targets", N * INT64)]
        if fp32_logits_held:
            outside.append(Term("loss.logits_fp32_held", N * cfg.vocab_size * FP32))
    # Inside a block's backward, besides what is still saved: the gradient of the residual stream and
    # those of the op being differentiated. FFN: SwiGLU's product backward holds three hidden-wide
    # gradients after w2 has freed its input (2 net), ReLU two (its output stays saved), GELU one net.
    # Attention: the gradient of its output plus dq, dk, dv.
    ffn_grads = (1 if cfg.activation in ("gelu", "gelu_tanh") else 2) * heads(cfg.hidden_dim)
    attn_grads = heads(2 * cfg.q_dim + 2 * cfg.kv_dim)
    working = N * (d + max(ffn_grads, attn_grads)) * a
    return Activations(per_layer=per_layer, layer_full=full, outside=outside, n_layers=cfg.n_layers, ac=ac,
                       backward_working=working, n_checkpointed=n_checkpointed)


def logits_transient_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Loss backward on top of the saved fp32 log-probs: the fp32 gradients of the log-probs and of the
    logits, 8 bytes per vocabulary entry per token (the TP head gathers the logits, so not split). The
    compute-dtype logits are freed once the loss has upcast them (the trainer holds no reference)."""
    if not cfg.lm_head:
        return 0.0
    return batch * seq_len * cfg.vocab_size * 2 * FP32


def largest_weight_elements(cfg: ModelConfig, tp: int = 1) -> int:
    """Elements of a block's largest projection weight on one rank (its gradient is computed whole)."""
    return max(cfg.dim * max(cfg.q_dim, cfg.hidden_dim), cfg.dim * cfg.hidden_dim) // tp
