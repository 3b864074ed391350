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
# The recipe options (README "Recipe"): per-head QK-norm (its weight replicated across TP ranks), squared-ReLU
# MLP, soft-capped logits.
TINY_RECIPE = dict(TINY, qk_norm=True, activation="relu2", ffn_hidden=192, logit_softcap=15.0)
MODELS = {"tiny": TINY, "tiny_gpt": TINY_GPT, "tiny_recipe": TINY_RECIPE}

SEQ, GLOBAL_BATCH, STEPS, LR, CLIP = 16, 4, 5, 3e-3, 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config(name: str):
    from lmforge.models.presets import model_config_from_dict

    return model_config_from_dict(MODELS[name])


def batches(vocab: int, steps: int = STEPS, seed: int = 1234, rows: int = GLOBAL_BATCH) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (rows, SEQ + 1), generator=g) for _ in range(steps)]


def train(model, data, dp_rank: int = 0, dp: int = 1, accum: int = 1) -> list[dict]:
    """AdamW + grad clipping on this rank's slice of each global batch; returns per-step global metrics.

    Step 0 also records every parameter's gradient norm: Adam is blind to a gradient scaled by a
    constant per tensor, so the final weights alone would not catch, say, a missing average.
    """
    from lmforge.distributed.process_group import all_reduce_mean
    from lmforge.distributed.world import no_sync

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    out = []
    for tokens in data:
        local = tokens.chunk(dp)[dp_rank]  # rank slice of the global batch
        if len(local) % accum:
            raise ValueError(f"{len(local)} rows per rank do not split into {accum} micro batches")
        loss_sum = 0.0
        for i, micro in enumerate(local.chunk(accum)):
            with no_sync(model, skip=i < accum - 1):  # the Trainer's gradient accumulation
                logits = model(micro[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten()) / accum
            loss.backward()
            loss_sum += loss.detach()
        metrics = {}
        if not out:
            metrics["param_grad_norms"] = {n: float(g.norm()) for n, g in full_grads(model).items()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)  # the trainer's clipping, on DTensor grads
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": all_reduce_mean(loss_sum), "grad_norm": float(norm), **metrics})
    return out


def data_parallel_wrapper(model) -> str:
    """Which data-parallel wrapper `parallelize` put on ``model``, read from the model itself: "fsdp" / "hsdp"
    (FSDP2 over a 1-D / (dp_replicate, dp_shard) mesh), "ddp" (composable replicate) or "none"."""
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        names = next(model.parameters()).device_mesh.mesh_dim_names
        return "hsdp" if "dp_replicate" in names else "fsdp"
    return "ddp" if "replicate" in (_get_registry(model) or {}) else "none"


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


def reference(model_name: str, ac: str = "none", compile_backend: str | None = None, accum: int = 1,
              rows: int = GLOBAL_BATCH):
    """One process, no wrappers: the numbers every parallel layout must reproduce."""
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig
    from lmforge.models.transformer import build_model

    cfg = model_config(model_name)
    model = build_model(cfg, seed=0)
    if ac != "none" or compile_backend:
        pc = ParallelConfig(activation_checkpoint=ac, compile=bool(compile_backend),
                            compile_backend=compile_backend or "inductor")
        parallelize(model, pc)
    metrics = train(model, batches(cfg.vocab_size, rows=rows), accum=accum)
    return metrics, full_state(model)


# ---- spawned ranks -----------------------------------------------------------------------------
def _entry(rank: int, world: int, port: int, target: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from lmforge.distributed.process_group import init_distributed, shutdown_distributed

    info = init_distributed(timeout_s=kwargs.pop("timeout_s", 120), device="cpu")
    if ":" in target:  # "module:function", importable from the parent's sys.path
        import importlib

        mod, name = target.split(":")
        fn = getattr(importlib.import_module(mod), name)
    else:
        fn = globals()[target]
    try:
        fn(info, **kwargs)
    finally:
        shutdown_distributed(info)


def spawn(world: int, target: str, **kwargs) -> None:
    """Run ``target(info, **kwargs)`` (a function of this module, or "module:function") on ``world`` gloo ranks."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, free_port(), target, kwargs), nprocs=world, join=True,
                       start_method="spawn")


def run_layouts(info, out_dir: str, layouts: dict) -> None:
    """For each named layout: build the same seeded model, parallelize, train, dump metrics + params."""
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import world_for
    from lmforge.models.transformer import build_model

    for name, spec in layouts.items():
        spec = dict(spec)
        cfg = model_config(spec.pop("model", "tiny"))
        accum = spec.pop("accum", 1)
        rows = spec.pop("rows", GLOBAL_BATCH)
        pcfg = ParallelConfig(**spec)
        world = world_for(pcfg, info.device)
        model = build_model(cfg, seed=0)
        parallelize(model, pcfg, world, device=info.device)
        metrics = train(model, batches(cfg.vocab_size, rows=rows), world.dp_rank, world.dp_size, accum)
        state = full_state(model)
        if info.rank == 0:
            from safetensors.torch import save_file

            save_file(state, str(Path(out_dir) / f"{name}.safetensors"))
            wrapper = data_parallel_wrapper(model)
            Path(out_dir, f"{name}.json").write_text(json.dumps({"metrics": metrics, "wrapper": wrapper}))


# ---- the real Trainer + ShardLoader on any world -----------------------------------------------
VOCAB_T, SEQ_T, BATCH_T = 96, 16, 8


def write_token_dir(d: Path, n_tokens: int = 6000, vocab: int = VOCAB_T) -> Path:
    """A token-shard dir (the `prepare` format) holding a fixed pseudo-random stream."""
    import hashlib

    import numpy as np

    from lmforge.data.shards import FORMAT

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    index = {"format": FORMAT, "version": 1, "tokenizer_hash": "sha256:test", "vocab_size": vocab,
             "dtype": "uint16", "eos_id": 0, "splits": {}}
    for split, n in (("train", n_tokens), ("val", 600)):
        blob = rng.integers(1, vocab, n).astype("uint16").tobytes()
        (d / f"{split}_00000.bin").write_bytes(blob)
        index["splits"][split] = {"tokens": n, "documents": 1, "shards": [
            {"file": f"{split}_00000.bin", "tokens": n, "documents": 1, "sha256": hashlib.sha256(blob).hexdigest()}]}
    (d / "index.json").write_text(json.dumps(index))
    return d


def trainer_config(run_dir, data_dir, max_steps: int, parallel: dict | None = None, **sections):
    from lmforge.config import from_dict
    from lmforge.train.config import PretrainConfig

    return from_dict(PretrainConfig, trainer_config_dict(run_dir, data_dir, max_steps, parallel, **sections))


def trainer_config_dict(run_dir, data_dir, max_steps: int, parallel: dict | None = None, **sections) -> dict:
    data = {
        "run": {"dir": str(run_dir)},
        "model": {"preset": "tiny", "vocab_size": VOCAB_T, "dim": 32, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 64, "max_seq_len": SEQ_T, "n_layers": 2},
        "data": {"dir": str(data_dir), "seq_len": SEQ_T},
        "train": {"global_batch": BATCH_T, "micro_batch": 2, "max_steps": max_steps, "resume": "auto"},
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 0.5},
        "schedule": {"name": "constant"},
        "eval": {"interval": 0, "batches": 0},
        "checkpoint": {"interval": 3, "keep_last": 5},
        "log": {"interval": 1, "peak_tflops": 1.0, "progress": False},
        "parallel": dict(parallel or {}),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


class RecordingSource:
    """A ShardLoader that appends the global window ids each rank reads to RUN/windows_rank<r>.jsonl."""

    def __init__(self, loader, run_dir: Path, rank: int, record: bool = True):
        self.loader, self.path = loader, Path(run_dir) / f"windows_rank{rank}.jsonl"
        self.record = record  # False on tensor-parallel peers (they read the same slice as TP index 0)

    def next_batch(self):
        ld = self.loader
        if self.record:
            per_rank = ld.global_batch // ld.world_size
            ids = ld.global_windows(ld.samples_seen + ld.rank * per_rank, per_rank)
            with open(self.path, "a") as f:
                f.write(json.dumps({"samples_seen": ld.samples_seen, "windows": [int(i) for i in ids]}) + "\n")
        return ld.next_batch()

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def run_trainer(run_dir, data_dir, max_steps: int, parallel: dict | None = None, world=None, device=None,
                **sections):
    """Train (or resume: train.resume=auto) the tiny model on the token dir; returns the TrainResult."""
    from lmforge.data.loader import ShardLoader
    from lmforge.distributed.world import setup_world
    from lmforge.models.transformer import build_model
    from lmforge.train.trainer import Job, Trainer, find_resume

    cfg = trainer_config(run_dir, data_dir, max_steps, parallel, **sections)
    if world is None:
        world, device = setup_world("cpu", cfg.parallel)
    mcfg = cfg.model_config()
    loader = ShardLoader(data_dir, "train", SEQ_T, BATCH_T, rank=world.dp_rank, world_size=world.dp_size, seed=0,
                         check_vocab=mcfg.vocab_size)
    resume = find_resume(Path(run_dir), cfg.train.resume)
    model = build_model(mcfg, seed=0, init=True)
    record = world.tp_rank == 0
    job = Job(model, RecordingSource(loader, run_dir, world.rank, record), max_steps,
              math_fields={"model": MODELS_T_KEY}, flops_per_token=mcfg.flops_per_token(SEQ_T))
    trainer = Trainer(cfg, job, world, device=device or "cpu", resume_from=resume)
    return trainer.fit()


MODELS_T_KEY = "tiny-trainer-v1"


def train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def windows_by_step(run_dir) -> dict[int, list[int]]:
    """Global window ids read at each step (key: samples consumed before it), all ranks together."""
    out: dict[int, list[int]] = {}
    for p in sorted(Path(run_dir).glob("windows_rank*.jsonl")):
        for line in p.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["samples_seen"], []).extend(row["windows"])
    return {k: sorted(v) for k, v in sorted(out.items())}


def run_trainer_jobs(info, jobs: list[dict]) -> None:
    """Spawned ranks: run each job dict(run_dir, data_dir, max_steps, parallel, copy_from=None) in turn."""
    import shutil

    import torch.distributed as dist

    from lmforge.distributed.world import setup_world

    for job in jobs:
        job = dict(job)
        src = job.pop("copy_from", None)
        if src and info.rank == 0:
            shutil.copytree(src, job["run_dir"])
        dist.barrier()
        parallel = job.pop("parallel", {})
        slow = job.pop("slow_rank1_save", False)
        world, device = setup_world("cpu", _pcfg(parallel))
        with _checkpoint_probe(info.rank, Path(job["run_dir"]), slow):
            run_trainer(world=world, device=device, parallel=parallel, **job)
        dist.barrier()


def _checkpoint_probe(rank: int, run_dir: Path, slow: bool):
    """Optionally make rank 1's shard writing slow and log when each rank finished it and who wrote LATEST."""
    import contextlib
    import time

    from lmforge.train import checkpoint as ckpt

    @contextlib.contextmanager
    def probe():
        if not slow:
            yield
            return
        orig_save, orig_write = ckpt.dcp.save, ckpt.atomic_write_text
        log = run_dir / f"probe_rank{rank}.jsonl"

        def save(*args, **kwargs):
            out = orig_save(*args, **kwargs)
            if rank == 1:
                time.sleep(1.0)
            with open(log, "a") as f:
                f.write(json.dumps({"event": "shards_done", "rank": rank, "t": time.time()}) + "\n")
            return out

        def write(path, text):
            orig_write(path, text)
            if Path(path).name == ckpt.LATEST:
                with open(log, "a") as f:
                    f.write(json.dumps({"event": "latest", "rank": rank, "t": time.time()}) + "\n")

        ckpt.dcp.save, ckpt.atomic_write_text = save, write
        try:
            yield
        finally:
            ckpt.dcp.save, ckpt.atomic_write_text = orig_save, orig_write

    return probe()


def _pcfg(parallel: dict):
    from lmforge.distributed.config import ParallelConfig

    return ParallelConfig(**parallel)
