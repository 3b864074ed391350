"""Shared pieces for the gloo tests: spawn N ranks ('spawn', never fork) and a minimal training step.

Kept free of pytest so spawned children import it cheaply.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.nn.functional as F

TINY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64,
            tie_embeddings=True)
# A GPT-2-style tiny model: learned positions, LayerNorm, biases, GELU (the non-Llama TP path).
TINY_GPT = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, max_seq_len=64,
                activation="gelu_tanh", norm="layernorm", pos_encoding="learned", bias=True, tie_embeddings=True)
MODELS = {"tiny": TINY, "tiny_gpt": TINY_GPT}

SEQ, GLOBAL_BATCH, STEPS, LR, CLIP = 16, 4, 5, 3e-3, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(name: str):
    from lmforge.models.presets import model_config_from_dict

    return model_config_from_dict(MODELS[name])


def batches(vocab: int, steps: int = STEPS, seed: int = 1234) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=g) for _ in range(steps)]


def train(model, data, dp_rank: int = 0, dp: int = 1, accum: int = 1) -> list[dict]:
    """AdamW + grad clipping on this rank's slice of each global batch; returns per-step global metrics.

    Step 0 also records every parameter's gradient norm: Adam is blind to a gradient scaled by a
    constant per tensor, so the final weights alone would not catch, say, a missing average.
    """
    from lmforge.distributed.parallelize import clip_grad_norm_, set_grad_sync
    from lmforge.distributed.process_group import all_reduce_mean

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    out = []
    for tokens in data:
        local = tokens.chunk(dp)[dp_rank]  # rank slice of the global batch
        loss_sum = 0.0
        for i, micro in enumerate(local.chunk(accum)):
            set_grad_sync(model, i == accum - 1)
            logits = model(micro[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten()) / accum
            loss.backward()
            loss_sum += loss.detach()
        metrics = {}
        if not out:
            metrics["param_grad_norms"] = {n: float(g.norm()) for n, g in full_grads(model).items()}
        norm = clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": all_reduce_mean(loss_sum), "grad_norm": float(norm), **metrics})
    return out


def full_state(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 parameters by name; a collective when they are DTensors."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = t.detach().float().cpu().clone()
    return out


def full_grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float()
            for n, p in model.named_parameters() if p.grad is not None}


def build_initial(model_name: str) -> dict[str, torch.Tensor]:
    from lmforge.models.transformer import build_model

    return {n: p.detach().clone() for n, p in build_model(model_config(model_name), seed=0).named_parameters()}


def reference(model_name: str, ac: str = "none", compile_backend: str | None = None, accum: int = 1):
    """One process, no wrappers: the numbers every parallel layout must reproduce."""
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.parallelize import parallelize
    from lmforge.models.transformer import build_model

    cfg = model_config(model_name)
    model = build_model(cfg, seed=0)
    if ac != "none" or compile_backend:
        pc = ParallelConfig(activation_checkpoint=ac, compile=bool(compile_backend),
                            compile_backend=compile_backend or "inductor")
        parallelize(model, pc)
    metrics = train(model, batches(cfg.vocab_size), accum=accum)
    return metrics, full_state(model)


# ---- spawned ranks -----------------------------------------------------------------------------
def _entry(rank: int, world: int, port: int, target: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lmforge.distributed.process_group import init_distributed, shutdown_distributed

    info = init_distributed(timeout_s=kwargs.pop("timeout_s", 120), device="cpu")
    try:
        globals()[target](info, **kwargs)
    finally:
        shutdown_distributed(info)


def spawn(world: int, target: str, **kwargs) -> None:
    """Run ``target(info, **kwargs)`` (a function of this module) on ``world`` gloo ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), target, kwargs), nprocs=world, join=True,
                       start_method="spawn")


def run_layouts(info, out_dir: str, layouts: dict) -> None:
    """For each named layout: build the same seeded model, parallelize, train, dump metrics + params."""
    from lmforge.distributed.config import ParallelConfig, ParallelDims
    from lmforge.distributed.parallelize import parallelize
    from lmforge.models.transformer import build_model

    for name, spec in layouts.items():
        spec = dict(spec)
        cfg = model_config(spec.pop("model", "tiny"))
        accum = spec.pop("accum", 1)
        pcfg = ParallelConfig(**spec)
        dims = ParallelDims.from_config(pcfg, info.world_size)
        model = build_model(cfg, seed=0)
        parallelize(model, pcfg, dims, device=info.device)
        metrics = train(model, batches(cfg.vocab_size), dims.dp_rank(info.rank), dims.dp, accum)
        state = full_state(model)
        if info.rank == 0:
            from safetensors.torch import save_file

            save_file(state, str(Path(out_dir) / f"{name}.safetensors"))
            wrapper = getattr(model, "_lmforge_parallel", {}).get("wrapper")
            Path(out_dir, f"{name}.json").write_text(json.dumps({"metrics": metrics, "wrapper": wrapper}))
