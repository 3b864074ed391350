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

Activation checkpointing (as `lmforge.distributed.apply.apply_ac` does it, per block):
  * ``full``      each block keeps only its input; its activations are rebuilt during backward.
  * ``selective`` the block input plus the outputs of every matmul (the projections, and the
    attention matmuls when attention is not a fused kernel) and of the fused attention kernel
    (output + log-sum-exp); norms, RoPE, activations and products are recomputed.

Besides what is saved, the peak adds the backward transients: the fp32 gradients of the logits in
the loss backward, or (whichever is larger) one block's backward: its recomputed activations when
checkpointed, the gradients in flight and the block's weight gradients.

This module imports no torch: it is arithmetic on the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.models.config import ModelConfig

AC_MODES = ("none", "selective", "full")
DEVICES = ("cuda", "cpu")
FP32 = 4
INT64 = 8
_FREED_BEFORE_BLOCKS = ("loss.log_probs_fp32", "head_input")  # and the final norm's tensors


@dataclass(frozen=True)
class Term:
    """One saved tensor (or a group of identical ones) of one micro batch on one rank."""

    name: str
    bytes: float


@dataclass
class Activations:
    """Bytes held for backward by one micro batch on one rank."""

    per_layer: list[Term] = field(default_factory=list)  # one block, as saved with the chosen AC
    layer_full: list[Term] = field(default_factory=list)  # one block without AC (rebuilt during backward)
    outside: list[Term] = field(default_factory=list)  # embeddings, RoPE tables, final norm, head, loss
    n_layers: int = 0
    ac: str = "none"
    backward_working: float = 0.0  # gradients alive inside one block's backward

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
        return self.n_layers * self.layer_bytes + self.outside_bytes

    @property
    def recompute_bytes(self) -> float:
        """Extra bytes alive while a checkpointed block is recomputed in backward (one block at a time)."""
        if self.ac == "none":
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
                         doc_mask: bool = False) -> Activations:
    """Saved-activation bytes for one micro batch of `batch` x `seq_len` tokens on one rank.

    `doc_mask`: an explicit (B, 1, T, T) attention mask (packed documents attend only within
    themselves); attention then keeps it as an additive bias in the compute dtype in every block."""
    if ac not in AC_MODES:
        raise ValueError(f"ac={ac!r} is not one of {AC_MODES}")
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
        if device == "cpu":  # composite RMSNorm also keeps x * rstd (for the weight's gradient)
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

    def ffn_core() -> list[Term]:
        h = N * cfg.hidden_dim
        if cfg.activation == "swiglu":  # w1 out, w3 out, silu(w1 out), their product (w2 input)
            return [Term("ffn.w1_out", heads(h * a)), Term("ffn.w3_out", heads(h * a)),
                    Term("ffn.silu_out", heads(h * a)), Term("ffn.w2_in", heads(h * a))]
        if cfg.activation == "relu":  # relu keeps its output, which is also w2's input
            return [Term("ffn.relu_out", heads(h * a))]
        return [Term("ffn.w1_out", heads(h * a)), Term("ffn.w2_in", heads(h * a))]

    dropout = [Term("dropout_mask", seq(N * d * mask_bytes))] if p else []
    proj_in = Term("proj_input", N * d * a)  # all-gathered input of the column-parallel projections
    if cfg.norm_position == "pre":
        full = (norm("attention_norm") + [Term("attention." + proj_in.name, proj_in.bytes)]
                + attention_core() + dropout
                + norm("ffn_norm") + [Term("feed_forward." + proj_in.name, proj_in.bytes)]
                + ffn_core() + dropout)
    else:  # post-norm: the block input feeds attention directly, norms sit on the residual sums
        full = ([Term("attention." + proj_in.name, proj_in.bytes)] + attention_core() + dropout
                + norm("attention_norm") + [Term("feed_forward." + proj_in.name, proj_in.bytes)]
                + ffn_core() + dropout + norm("ffn_norm"))
        # The post-norm block input is the previous norm's output, held by the projections; the block
        # output is counted by the next block (or as the head input).

    block_input = Term("block_input", seq(N * d * a))
    if ac == "none":
        per_layer = full
    elif ac == "full":
        per_layer = [block_input]
    else:  # selective: every matmul output (projections, and the attention matmuls when not fused)
        per_layer = [block_input]
        for name, width, kind, _bias in _linears(cfg):
            el = N * width
            per_layer.append(Term(f"{name}.out", heads(el * a) if kind == "heads" else el * a))
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
    outside.append(Term("head_input", N * d * a))  # final hidden states, kept by the LM head / task head
    if cfg.lm_head:
        # the TP head gathers the logits (output_layouts=Replicate()), so every rank holds all of them
        outside += [Term("loss.log_probs_fp32", N * cfg.vocab_size * FP32),
                    Term("loss.targets", N * INT64)]
    # Inside a block's backward, besides what is still saved: the gradient of the residual stream and
    # those of the op being differentiated. FFN: SwiGLU's product backward holds three hidden-wide
    # gradients after w2 has freed its input (2 net), ReLU two (its output stays saved), GELU one net.
    # Attention: the gradient of its output plus dq, dk, dv.
    ffn_grads = (1 if cfg.activation in ("gelu", "gelu_tanh") else 2) * heads(cfg.hidden_dim)
    attn_grads = heads(2 * cfg.q_dim + 2 * cfg.kv_dim)
    working = N * (d + max(ffn_grads, attn_grads)) * a
    return Activations(per_layer=per_layer, layer_full=full, outside=outside, n_layers=cfg.n_layers, ac=ac,
                       backward_working=working)


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
