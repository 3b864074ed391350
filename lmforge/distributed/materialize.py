"""Give a model built on the meta device real weights, rank by rank, after it was parallelized.

The recipe builds the `Transformer` on ``meta`` (no memory) and attaches a weight source
(`attach_weights`); `lmforge.distributed.world.parallelize_model` applies TP -> AC -> compile -> FSDP2
to the meta model and then calls `materialize`: ``to_empty`` allocates only this rank's shards, and
the source fills them. Peak memory per rank is the model ÷ shard degree plus a bounded scratch.

Two sources:

- `ShardedInit(seed)`: the 1-process initialization (`Transformer.init_weights`) reproduced bit for bit.
  Every rank draws every tensor from the same seeded generator, in the same order, and keeps its slice.
  On CPU the draw streams in row chunks (the CPU generator fills elements one after another, so chunked
  draws consume the same numbers as one whole-tensor draw); on CUDA one tensor is drawn whole at a time.
  DTensor's own random ops are not used: torch 2.13's offset-based RNG tracker refuses CPU meshes, and a
  random op on a CPU DTensor then draws each rank's shard from that rank's generator, so ranks with the
  same seed repeat one another's values.
- `ShardedLoad(model_dir)`: each rank reads only its slices of the safetensors files
  (``safe_open(...).get_slice``); nobody holds the full state dict.

A shard is described per tensor dimension by the global indices the rank holds (`local_indices`),
which covers FSDP2's ``Shard(0)``, TP's colwise/rowwise ``Shard(0|1)``, ``Replicate`` and the
``_StridedShard`` FSDP2 uses on top of TP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lmforge.artifacts.model_dir import index_weight_map
from lmforge.config import UserError

_ATTR = "_lmforge_weights"  # the weight source a recipe attaches to a meta model
_CHUNK_ELEMENTS = 1 << 24  # CPU init scratch: 16M values (64 MB fp32) per draw


# ---- which part of a tensor this rank holds --------------------------------------------------------
def local_indices(t: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension of ``t``'s global shape, the (sorted) global indices this rank's local tensor holds.

    The local tensor equals ``full[idx0][:, idx1]...`` (sharding acts on each dimension on its own).
    A plain tensor holds everything. Computed by distributing a 1-D ``arange`` per dimension with the
    placements that act on it (no communication: ``src_data_rank=None``).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor):
        return [torch.arange(n) for n in t.shape]
    out = []
    for d, size in enumerate(t.shape):
        placements = []
        for p in t.placements:
            if hasattr(p, "split_factor") and p.dim == d:  # _StridedShard (FSDP2 over a TP-sharded dim)
                placements.append(_StridedShard(0, split_factor=p.split_factor))
            elif p.is_shard(d):
                placements.append(Shard(0))
            elif hasattr(p, "split_factor") or p.is_shard() or p.is_replicate():
                placements.append(Replicate())
            else:
                raise ValueError(f"cannot place weights into a {p} DTensor (a parameter is never Partial)")
        idx = distribute_tensor(torch.arange(size), t.device_mesh, placements, src_data_rank=None)
        out.append(idx.to_local().cpu())
    return out


def runs(idx: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted indices -> contiguous [start, stop) runs (one run for a plain shard)."""
    if idx.numel() == 0:
        return []
    breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1).tolist()
    starts = [0, *breaks]
    stops = [*breaks, idx.numel()]
    return [(int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def read_block(get, index_runs: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Assemble the local tensor from contiguous blocks ``get(tuple of slices)`` (one per run combination)."""
    return _assemble(get, index_runs, (), 0)


def _assemble(get, index_runs, prefix: tuple[slice, ...], dim: int) -> torch.Tensor:
    # A module-level recursion: a nested recursive closure would form a reference cycle that keeps
    # ``get``'s buffer (the init's scratch) alive until the garbage collector runs.
    if dim == len(index_runs):
        return get(prefix)
    parts = [_assemble(get, index_runs, prefix + (slice(a, b),), dim + 1) for a, b in index_runs[dim]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def local_view(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank owns for parameter/buffer ``p`` (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters())


# ---- sources --------------------------------------------------------------------------------------
class ShardedInit:
    """`Transformer.init_weights(seed)` applied to a sharded model: the same values, only local slices kept."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        device = model.tok_embeddings.weight.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        for param, kind, std in init_plan(model):
            local = local_view(param)
            if kind == "ones":
                local.fill_(1.0)
            elif kind == "zeros":
                local.zero_()
            else:
                _draw_local(param, local, std, gen)

    def describe(self) -> str:
        return f"sharded init (seed {self.seed})"


class ShardedLoad:
    """Fill a (sharded) `Transformer` from an lmforge model dir, each rank reading only its slices."""

    def __init__(self, directory: str | Path, weights_name: str = "model.safetensors"):
        self.directory = Path(directory)
        self.weights_name = weights_name

    def files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
        from safetensors import safe_open

        single = self.directory / self.weights_name
        index = self.directory / (self.weights_name.removesuffix(".safetensors") + ".safetensors.index.json")
        if single.is_file():
            with safe_open(str(single), framework="pt") as f:
                return dict.fromkeys(f.keys(), single)
        if index.is_file():
            return index_weight_map(index, "re-export the model")
        raise UserError(f"'{self.directory}' holds no {self.weights_name} (or its index); pass a model dir "
                        "written by lmforge (RUN/model, `lmforge import`)")

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        from safetensors import safe_open

        where = self.files()
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update((n, b) for n, b in model.named_buffers() if _persistent(model, n))
        tied = getattr(model.cfg, "tie_embeddings", False)
        wanted = {n for n in targets if not (tied and n == "output.weight")}
        missing = sorted(wanted - set(where))
        unexpected = sorted(set(where) - set(targets))
        if missing or unexpected:
            raise UserError(f"weights in '{self.directory}' do not match its config.json: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}; re-export the model dir")
        by_file: dict[Path, list[str]] = {}
        for name in sorted(wanted):
            by_file.setdefault(where[name], []).append(name)
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    t = targets[name]
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(t.shape):
                        raise UserError(f"'{name}' in {path} has shape {list(shape)}, the model expects "
                                        f"{list(t.shape)}; the model dir's config.json does not match its weights")
                    local = local_view(t)
                    if local.numel() == 0:
                        continue
                    sl = f.get_slice(name)
                    block = read_block(lambda s, sl=sl: sl[s] if s else sl[:],
                                       [runs(i) for i in local_indices(t)])
                    local.copy_(block.to(dtype=local.dtype))

    def describe(self) -> str:
        return f"sharded load from {self.directory}"


def _persistent(model: nn.Module, name: str) -> bool:
    mod_name, _, buf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return buf not in mod._non_persistent_buffers_set


def init_plan(model: nn.Module) -> Iterator[tuple[torch.Tensor, str, float]]:
    """(parameter, 'normal' | 'ones' | 'zeros', std) in `Transformer.init_weights`'s exact order.

    Must stay in step with `Transformer.init_weights` (a test holds a sharded init bitwise equal to it).
    """
    std = model.cfg.init_std
    out_std = std / math.sqrt(2 * model.cfg.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield module.weight, "normal", (out_std if name.endswith((".wo", ".w2")) else std)
            if module.bias is not None:
                yield module.bias, "zeros", 0.0
        elif isinstance(module, nn.Embedding):
            yield module.weight, "normal", std
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                yield module.weight, "ones", 0.0
            if getattr(module, "bias", None) is not None:
                yield module.bias, "zeros", 0.0


def _trunc_normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    nn.init.trunc_normal_(t, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=gen)


def _draw_local(param: torch.Tensor, local: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Draw ``param``'s whole value from ``gen`` (advancing it as the 1-process init does), keep the local part."""
    idx = local_indices(param)
    shape = tuple(param.shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 0
    if gen.device.type == "cpu" and len(shape) >= 2 and row % 16 == 0 and local.is_contiguous():
        _stream_trunc_normal(shape, idx, local, std, gen)
        return
    full = torch.empty(shape, dtype=local.dtype, device=local.device)
    _trunc_normal(full, std, gen)
    if local.numel():
        local.copy_(read_block(lambda s: full[s], [runs(i) for i in idx]))


def _stream_trunc_normal(shape: tuple[int, ...], idx: list[torch.Tensor], local: torch.Tensor, std: float,
                         gen: torch.Generator) -> None:
    """`nn.init.trunc_normal_` on a full fp32 CPU tensor of ``shape``, drawn in row chunks, local part kept.

    torch 2.13 samples a ±3σ truncated normal by rejection: ``normal_`` over the whole tensor, then
    whole-tensor redraws whose values replace the out-of-bounds ones until none is left. The CPU
    ``normal_`` fills blocks of 16 values from uniforms drawn one after another, so chunks whose sizes
    are multiples of 16 consume the generator exactly as one whole draw does. Here each round streams
    the same draws through a chunk-sized scratch; only the (few) rejected flat indices are remembered.
    A test holds the result bitwise equal to the 1-process `Transformer.init_weights`.
    """
    n_rows, row = shape[0], math.prod(shape[1:])
    step = max(1, _CHUNK_ELEMENTS // row)
    lo = torch.tensor(-3 * std, dtype=local.dtype).item()
    hi = torch.tensor(3 * std, dtype=local.dtype).item()
    inv = []  # per dim: global index -> local index (-1 = not held)
    for size, i in zip(shape, idx, strict=True):
        m = torch.full((size,), -1, dtype=torch.long)
        m[i] = torch.arange(i.numel())
        inv.append(m)
    flat_local = local.view(-1)
    local_strides = torch.tensor(local.stride(), dtype=torch.long)
    global_strides = torch.tensor(torch.empty(shape, device="meta").stride(), dtype=torch.long)

    def to_local(flat: torch.Tensor) -> torch.Tensor:
        """Global flat indices -> local flat indices (-1 where this rank does not hold the element)."""
        pos = torch.zeros_like(flat)
        held = torch.ones_like(flat, dtype=torch.bool)
        rem = flat
        for d in range(len(shape)):
            coord = rem // global_strides[d]
            rem = rem % global_strides[d]
            li = inv[d][coord]
            held &= li >= 0
            pos += li.clamp(min=0) * local_strides[d]
        return torch.where(held, pos, -1)

    scratch = torch.empty(min(step, n_rows) * row, dtype=local.dtype)
    pending = None  # flat indices still out of bounds (None before the first round)
    while pending is None or pending.numel():
        still = []
        for start in range(0, n_rows, step):
            a, b = start * row, min(start + step, n_rows) * row
            chunk = scratch[: b - a]
            chunk.normal_(0.0, std, generator=gen)
            if pending is None:  # first round: every element takes its draw; remember the out-of-bounds ones
                rows = chunk.view(-1, *shape[1:])
                sel = inv[0][start:start + rows.shape[0]] >= 0
                if bool(sel.any()):
                    mine = torch.nonzero(sel).flatten()
                    block = read_block(lambda s, rows=rows: rows[s], [runs(mine), *[runs(i) for i in idx[1:]]])
                    local.index_copy_(0, inv[0][start + mine], block)
                still.append(torch.nonzero((chunk < lo) | (chunk > hi)).flatten() + a)
                continue
            flat = pending[(pending >= a) & (pending < b)]
            vals = chunk[flat - a]
            bad = (vals < lo) | (vals > hi)
            dst = to_local(flat[~bad])
            keep = dst >= 0
            flat_local[dst[keep]] = vals[~bad][keep]
            still.append(flat[bad])
        pending = torch.cat(still)


# ---- entry points ---------------------------------------------------------------------------------
def attach_weights(model: nn.Module, source) -> nn.Module:
    """Mark a meta-device model with where its weights come from (`ShardedInit`, `ShardedLoad` or None =
    uninitialized, for a checkpoint load right after); `materialize` uses it."""
    setattr(model, _ATTR, source)
    return model


def weight_source(model: nn.Module):
    return getattr(model, _ATTR, None)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate a meta model's (local shards of) parameters on ``device`` and fill them from its source."""
    device = torch.device(device)
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):  # to_empty gives plain (non-DTensor) parameters new objects: re-tie first
        model.tie_weights()
    source = weight_source(model)
    if source is not None:
        source(model)
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    setattr(model, _ATTR, None)
    return model


__all__ = ["ShardedInit", "ShardedLoad", "attach_weights", "init_plan", "is_meta", "local_indices",
           "materialize", "read_block", "runs", "weight_source"]
