"""Apply parallelism to a single-device `Transformer` from outside, in torchtitan's order:

    tensor parallel (DTensor plan) -> activation checkpointing -> torch.compile per block -> FSDP2 / DDP

Nothing here renames a module: activation checkpointing and compile replace each block's
``forward`` on the instance (no ``_checkpoint_wrapped_module`` / ``_orig_mod`` in the keys), TP
and FSDP2 swap parameters for DTensors in place, DDP is the composable ``replicate``. So
``model.state_dict()`` keys stay the checkpoint keys documented in `lmforge.models.transformer`.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError
from lmforge.distributed.config import ParallelConfig, ParallelDims, parse_ac_policy

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks that AC, compile and FSDP2 wrap one by one: ``model.layers`` of a Transformer,
    or of the backbone a head is injected around (a sequence classifier, a reward model)."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "backbone"):
        layers = getattr(model.backbone, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no transformer blocks (.layers or .backbone.layers)")
    return layers


# ---- tensor parallel ---------------------------------------------------------------------------
def _replicated_style():
    """A ParallelStyle that keeps a small module whole on every TP rank (params become Replicate DTensors).

    Every parameter of a TP model must be a DTensor on the TP mesh (FSDP2's 2-D sharding and the
    gradient-norm reduction expect one kind); inputs arrive and outputs leave as plain local tensors.
    """
    from torch.distributed.tensor import DTensor, Replicate, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class _Replicated(ParallelStyle):
        def _apply(self, module, device_mesh):
            def input_fn(mod, inputs, mesh):
                return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                             if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                             else x for x in inputs)

            def output_fn(mod, out, mesh):
                return out.to_local() if isinstance(out, DTensor) else out

            return distribute_module(module, device_mesh, None, input_fn, output_fn)

    return _Replicated()


def _gather_sequence_hook(tp_mesh):
    """Forward hook: a sequence-sharded local output -> the full sequence on every TP rank."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    def hook(module, inputs, output):
        dt = output if isinstance(output, DTensor) else DTensor.from_local(output, tp_mesh, [Shard(1)], run_check=False)
        return dt.redistribute(placements=[Replicate()]).to_local()

    return hook


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool = True) -> None:
    """Megatron-style tensor parallelism with DTensor: q/k/v and w1/w3 colwise, wo and w2 rowwise.

    With ``sequence_parallel`` the residual stream between blocks (and every norm) is sharded along
    the sequence; attention and the MLP all-gather their input and reduce-scatter their output.
    The vocabulary is sharded in the embedding (rowwise) and the LM head (colwise, logits gathered),
    so tied embeddings stay tied (both are Shard(0) of the same matrix). The model's Attention reads
    its local head count from the projected width, so no model code changes are needed.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    cfg = model.cfg
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()

    def norm_style():
        return SequenceParallel(use_local_output=True) if sp else _replicated_style()

    # Token embeddings alone can emit the sequence shard directly; learned/sinusoidal positions,
    # token types and an embedding norm are added on the full sequence, which block 0 then splits.
    simple_embed = (cfg.pos_encoding in ("rope", "none") and not cfg.type_vocab_size and not cfg.embedding_norm)
    root_plan: dict = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(),
                                                         output_layouts=seq if simple_embed else Replicate())}
    for name in ("pos_embeddings", "token_type_embeddings", "embedding_norm"):
        if hasattr(model, name):
            root_plan[name] = _replicated_style()
    if cfg.final_norm:
        root_plan["norm"] = norm_style()
    if cfg.lm_head:
        root_plan["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    parallelize_module(model, tp_mesh, root_plan)

    for i, block in enumerate(model.layers):
        plan = {
            "attention_norm": norm_style(),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "ffn_norm": norm_style(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
        }
        if hasattr(block.feed_forward, "w3"):
            plan["feed_forward.w3"] = ColwiseParallel()
        if cfg.qk_norm:
            # q/k leave wq/wk as (B, T, local heads, d): the norm weight stays whole (Replicate) and sees
            # the heads as a Shard(2) input, so its gradient is summed over the TP ranks (torchtitan's Qwen3)
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if sp:
            # Attention(x, rope, mask, cache, layer_idx) / FeedForward(x): gather the sequence first.
            plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                                   desired_input_layouts=(Replicate(), None, None, None, None))
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            if i == 0 and not simple_embed:
                # TransformerBlock(x, rope, mask, cache): split the full-sequence embeddings.
                plan[""] = PrepareModuleInput(input_layouts=(Replicate(), None, None, None),
                                              desired_input_layouts=(Shard(1), None, None, None),
                                              use_local_output=True)
        if plan.get(""):
            parallelize_module(block, tp_mesh, plan.pop(""))
        parallelize_module(block, tp_mesh, plan)

    if sp and not cfg.lm_head:  # hidden states leave the model whole (heads are plain modules)
        model.norm.register_forward_hook(_gather_sequence_hook(tp_mesh))
    if cfg.tie_embeddings:
        model.tie_weights()  # both sides were distributed separately; share the one Shard(0) DTensor again


# ---- activation checkpointing ------------------------------------------------------------------
# The policies `parallel.activation_checkpoint` names (`lmforge.distributed.config.parse_ac_policy`
# checks them; the planner's `--ac` uses the same names):
#   none       nothing recomputed;
#   full       every block keeps only its input and re-runs whole in backward;
#   selective  torchtitan's op-level SAC (``selective_ac_option = "op"``): keep the outputs of the save-list
#              ops except every second ``mm`` of a block (counted apart in forward and in recompute);
#   matmuls    keep every save-list op's output (all matmuls, attention, reduce-scatter), recompute the rest;
#   layer-N    torchtitan's layer SAC (``selective_ac_option = "N"``): full AC on blocks N, 2N, ... (1-based).
@functools.cache
def _save_ops() -> frozenset:
    """Ops whose outputs the op-level policies keep: matmuls, attention kernels, TP's reduce-scatter."""
    names = [
        ("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"),
        ("aten", "_scaled_dot_product_flash_attention"),
        ("aten", "_scaled_dot_product_efficient_attention"),
        ("aten", "_scaled_dot_product_cudnn_attention"),
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
        ("_c10d_functional", "reduce_scatter_tensor"),
    ]
    ops = set()
    for ns, name in names:
        packet = getattr(getattr(torch.ops, ns), name, None)
        if packet is not None and hasattr(packet, "default"):
            ops.add(packet.default)
    return frozenset(ops)


def matmuls_policy():
    """SAC policy ``matmuls``: save every matmul / attention / reduce-scatter output, recompute everything else.

    Recomputed in backward: norms, RoPE, activations (SiLU/GELU), gating products, dropout masks
    and residual adds — cheap pointwise work whose activations are a large share of the memory.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    save = _save_ops()

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_policy():
    """SAC policy ``selective`` (torchtitan's op level) for ONE checkpointed call: the save list, but every
    second ``aten.mm`` is recomputed. The mm counter lives in this closure, counted separately in the
    forward and in the recompute so both make the same decisions; build a fresh policy per call."""
    from torch.utils.checkpoint import CheckpointPolicy

    save, mm = _save_ops(), torch.ops.aten.mm.default
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx, func, *args, **kwargs):
        if func == mm:
            phase = "recompute" if ctx.is_recompute else "forward"
            counts[phase] += 1
            keep = counts[phase] % 2 == 1  # the 1st, 3rd, ... mm of the call is kept
        else:
            keep = func in save
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_policy())  # a fresh mm counter per block call


def _checkpoint_block(block: nn.Module, mode: str, context_fn) -> None:
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    def forward(*args, _inner=inner, **kwargs):
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(_inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

    functools.update_wrapper(forward, inner)
    block.forward = forward
    block._lmforge_ac = mode


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing per block with one of the policies above (`none` leaves the model alone)."""

    policy, every = parse_ac_policy(mode)
    if policy == "none":
        return
    context_fn = None
    if policy == "selective":
        context_fn = _selective_context
    elif policy == "matmuls":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        context_fn = functools.partial(create_selective_checkpoint_contexts, matmuls_policy())
    for i, block in enumerate(transformer_blocks(model)):
        if (i + 1) % every == 0:  # layer-N: blocks N, 2N, ... counted from 1; every block otherwise
            _checkpoint_block(block, mode, context_fn)


# ---- compile -----------------------------------------------------------------------------------
def apply_compile(model: nn.Module, backend: str = "inductor", fullgraph: bool = False) -> None:
    """torch.compile each block's forward (the repeated structure compiles once and is reused)."""
    for block in transformer_blocks(model):
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=fullgraph)
        block._lmforge_compiled = backend


# ---- data parallel -----------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> None:
    """FSDP2: fully_shard each block, then the root (embeddings, final norm, head).

    The last block is not resharded after forward: backward needs it first, so the all-gather
    would be repeated at once. Master weights, gradients and optimizer state stay fp32 (sharded);
    ``param_dtype`` is the all-gathered compute copy, ``reduce_dtype`` the gradient reduction.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = transformer_blocks(model)
    n = len(blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh, device: torch.device) -> None:
    """Replicated data parallel (composable `replicate` = DDP without renaming modules)."""
    from torch.distributed._composable.replicate import replicate

    kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
    replicate(model, device_mesh=dp_mesh, **kwargs)


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on or off (``set_requires_gradient_sync`` of FSDP2 / HSDP / replicate).

    Composable replicate (DDP) reads the flag in forward, FSDP2 in backward: set it before both. Off under
    FSDP2 keeps unsharded gradients; gradient accumulation goes through `lmforge.distributed.world.no_sync`,
    which picks per wrapper. A model without a data-parallel wrapper has nothing to synchronise.
    """
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 / HSDP / replicate
        model.set_requires_gradient_sync(enabled)


# ---- entry point -------------------------------------------------------------------------------
def compute_dtypes(cfg: ParallelConfig, device: torch.device,
                   precision: str | None = None) -> tuple[torch.dtype, torch.dtype]:
    """(param/compute dtype, gradient-reduce dtype); CPU always runs fp32.

    ``param_dtype: auto`` follows the trainer's ``train.precision`` when given (bf16 -> bf16, fp32 or
    fp16 -> fp32 params, fp16 being autocast's business) and is bf16 otherwise.
    """
    if device.type != "cuda":
        return torch.float32, torch.float32
    name = cfg.param_dtype
    if name == "auto":
        name = "bf16" if precision in (None, "bf16") else "fp32"
    return _DTYPES[name], _DTYPES[cfg.reduce_dtype]


def parallelize(model: nn.Module, cfg: ParallelConfig, world=None, device: torch.device | str | None = None,
                precision: str | None = None) -> nn.Module:
    """Apply TP -> AC -> compile -> FSDP2/DDP to ``model`` in place, on the meshes of ``world``; returns it.

    ``world`` is the run's `lmforge.distributed.world.World` (its one DeviceMesh is reused: no new
    communicators per call); without one, a World is made for the current process group (a plain single
    process when there is none). The model must hold fp32 weights, identical on every rank (same seed, or
    loaded before). Data-parallel wrapper, from ``world.dims.data_parallel``:
      - "fsdp"/"hsdp": FSDP2 over the dp_shard (or (dp_replicate, dp_shard)) mesh;
      - "ddp": composable replicate over dp_replicate;
      - "none" (one data-parallel rank): on CUDA with a process group and bf16, FSDP2 over the
        size-1 mesh anyway, so its MixedPrecisionPolicy keeps fp32 master weights; else nothing.
    Without a process group (plain single process) only AC and compile apply. ``precision`` is the
    trainer's train.precision, which ``parallel.param_dtype: auto`` follows.
    """
    from lmforge.distributed.world import world_for  # lazy: cycle, distributed.world imports this module

    device = torch.device(device) if device is not None else next(model.parameters()).device
    have_pg = dist.is_available() and dist.is_initialized()
    if world is None:
        world = world_for(cfg, device)
    dims = world.dims
    size = dist.get_world_size() if have_pg else 1
    if dims.world_size != size:
        raise ConfigError(f"parallel dims were resolved for world size {dims.world_size}, but this job has {size}")
    if ParallelDims.from_config(cfg, size) != dims:  # ConfigError naming the fix when the section does not fit
        raise ConfigError(f"the parallel section ({ParallelDims.from_config(cfg, size).describe()}) is not the "
                          f"World's layout ({dims.describe()}); build the World from the same parallel section")
    dims.check_model(model.cfg)
    if dims.data_parallel == "ddp" and dims.tp > 1:
        raise ConfigError(
            f"parallel.dp_replicate={dims.dp_replicate} with tp={dims.tp} and dp_shard=1: DDP does not compose "
            "with tensor parallel; use parallel.dp_shard>1 (FSDP2/HSDP) instead of dp_replicate"
        )
    param_dtype, reduce_dtype = compute_dtypes(cfg, device, precision)

    if dims.tp > 1:
        if not hasattr(model, "layers"):
            raise ConfigError(f"parallel.tp={dims.tp}: tensor parallel applies to the plain Transformer, not to "
                              f"a {type(model).__name__} (a head around a backbone); set parallel.tp=1 and shard "
                              "with parallel.dp_shard (FSDP2) instead")
        apply_tp(model, world.tp_mesh, cfg.sequence_parallel)
    apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile:
        apply_compile(model, cfg.compile_backend)

    wrapper = dims.data_parallel
    if wrapper == "none" and world.distributed and device.type == "cuda" and param_dtype != torch.float32:
        wrapper = "fsdp"
    if wrapper in ("fsdp", "hsdp"):
        apply_fsdp(model, world.fsdp_mesh, param_dtype, reduce_dtype, cfg.reshard_after_forward)
    elif wrapper == "ddp":
        apply_ddp(model, world.ddp_mesh, device)
    return model
