"""Checkpoint verification in a distributed run: rank 0 hashes, every rank gets its answer (2 gloo ranks,
spawned). A 7B checkpoint with optimizer state is ~84 GB; hashing it once per rank would read it N times."""

import json
import os
import socket

import torch.multiprocessing as mp

from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import OptimConfig
from lmforge.train.optim import build_optimizer

CFG = get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, ckpt_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from lmforge.config import UserError
    from lmforge.train import checkpoint as ck

    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hashed = []
    real = ck._sha256
    ck._sha256 = lambda p: hashed.append(p.name) or real(p)
    result = {"latest": str(ck.latest_checkpoint(ckpt_dir)),
              "resolved_run": str(ck.resolve_checkpoint(os.path.dirname(ckpt_dir)))}
    try:
        ck.resolve_checkpoint(os.path.join(ckpt_dir, "step_000002"))
    except UserError as e:
        result["explicit_error"] = str(e)
    result["hashed"] = len(hashed)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_verifies_and_every_rank_gets_the_same_answer(tmp_path):
    model = build_model(CFG, seed=0)
    mgr = ckpt.CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=3)
    opt = build_optimizer(model, OptimConfig())
    for step in (1, 2):
        mgr.save(step, model, opt, {"tokens": step}, {})
    shard = tmp_path / "run" / "checkpoints" / "step_000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size: only the hash can tell
    shard.write_bytes(bytes(data))
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path / "run" / "checkpoints"), str(tmp_path)),
                       nprocs=2, start_method="spawn", join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["latest"] == r1["latest"] == str(tmp_path / "run" / "checkpoints" / "step_000001")
    assert r0["resolved_run"] == r1["resolved_run"] == r0["latest"]
    assert "sha256" in r0["explicit_error"] and r1["explicit_error"] == r0["explicit_error"]
    assert r0["hashed"] > 0 and r1["hashed"] == 0
