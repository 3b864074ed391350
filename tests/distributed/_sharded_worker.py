"""Spawned-rank bodies for the sharded init / sharded loading tests (kept free of pytest)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

TOKENS_SEED = 99


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe_tokens(vocab: int, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(TOKENS_SEED))


def model_config(spec: dict):
    from lmforge.models.presets import model_config_from_dict

    return model_config_from_dict(spec)


def world_for(info, pcfg):
    from lmforge.distributed.world import world_for

    return world_for(pcfg, info.device)


def build_sharded(info, spec: dict, parallel: dict, model_dir: str | None):
    """The recipes' path: meta build -> `parallelize_model` (TP -> AC -> compile -> FSDP2) -> local shards filled."""
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import build_for_world, parallelize_model

    pcfg = ParallelConfig(**parallel)
    world = world_for(info, pcfg)
    cfg = model_config(spec)
    model = build_for_world(cfg, world, info.device, seed=0, model_dir=model_dir)
    built_on_meta = any(p.is_meta for p in model.parameters())
    parallelize_model(model, SimpleNamespace(parallel=pcfg), world, info.device)
    return model, built_on_meta


def full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def local_numel(model) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in {id(p): p for p in model.parameters()}.values())


def layouts(info, out_dir: str, spec: dict, layouts: dict, model_dir: str | None = None) -> None:
    """Per named layout: build sharded (init, or load from ``model_dir``), dump full params and probe logits."""
    from safetensors.torch import save_file

    for name, parallel in layouts.items():
        model, on_meta = build_sharded(info, spec, parallel, model_dir)
        with torch.no_grad():
            logits = model(probe_tokens(spec["vocab_size"])).float()
        state = full_state(model)
        if info.rank == 0:
            state["__logits__"] = logits.contiguous()
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out_dir) / f"{name}.safetensors"))
            Path(out_dir, f"{name}.json").write_text(json.dumps({"built_on_meta": on_meta}))
        del model, state


def wide(info, out_dir: str, spec: dict, tag: str, model_dir: str | None = None) -> None:
    """7B-width model on this job's ranks (FSDP2 over all): peak RSS per rank and the probe logits."""
    model, on_meta = build_sharded(info, spec, {"dp_shard": -1}, model_dir)
    # Measured before the forward: FSDP2's forward all-gathers the root and each block (training-time
    # memory, the same with any init), which is not what this figure is about.
    rss, numel = peak_rss_mb(), local_numel(model)
    with torch.no_grad():
        logits = model(probe_tokens(spec["vocab_size"])).float()
    rss_after_forward = peak_rss_mb()
    stats = {}
    if model_dir is None:  # per-tensor mean/std of the sharded init, from local sums (no gather)
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        for n, p in model.named_parameters():
            local = (p.to_local() if isinstance(p, DTensor) else p).detach().double()
            s = torch.stack([local.sum(), (local * local).sum(), torch.tensor(float(local.numel()), dtype=torch.double)])
            if isinstance(p, DTensor):
                dist.all_reduce(s)
            mean = s[0] / s[2]
            stats[n] = [float(mean), float((s[1] / s[2] - mean * mean).clamp(min=0).sqrt())]
    out = {"rank": info.rank, "peak_rss_mb": rss, "peak_rss_after_forward_mb": rss_after_forward,
           "built_on_meta": on_meta, "local_numel": numel, "stats": stats}
    Path(out_dir, f"{tag}_rank{info.rank}.json").write_text(json.dumps(out))
    if info.rank == 0:
        torch.save(logits, Path(out_dir) / f"{tag}_logits.pt")


def wide_reference(out_dir: str, spec: dict, save_dir: str | None, load_dir: str | None) -> None:
    """One process, no process group: the full build (or full load) and its peak RSS."""
    import torch

    torch.set_num_threads(1)
    from lmforge.artifacts.model_dir import load_model_dir, save_model_dir
    from lmforge.models.transformer import build_model

    cfg = model_config(spec)
    if load_dir:
        model = load_model_dir(load_dir)
        tag = "ref_load"
    else:
        model = build_model(cfg, seed=0)
        tag = "ref_init"
    rss = peak_rss_mb()
    with torch.no_grad():
        logits = model(probe_tokens(spec["vocab_size"])).float()
    stats = {n: [float(p.detach().double().mean()), float(p.detach().double().std(unbiased=False))]
             for n, p in model.named_parameters()}
    Path(out_dir, f"{tag}.json").write_text(json.dumps({"peak_rss_mb": rss, "stats": stats,
                                                         "numel": sum(p.numel() for p in model.parameters())}))
    torch.save(logits, Path(out_dir) / f"{tag}_logits.pt")
    if save_dir:
        save_model_dir(model, save_dir, max_shard_bytes=400 * 1024**2)
