"""Checkpoint verification in a distributed run: the ranks hash the newest checkpoint together (each file
once, by one rank), rank 0 decides, every rank gets its answer (2 gloo ranks, spawned). A 7B checkpoint with
optimizer state is ~84 GB; hashing it once per rank would read it N times, on rank 0 alone N times slower."""

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
    ck._sha256 = lambda p: hashed.append(f"{p.parent.name}/{p.name}") or real(p)
    result = {"latest": str(ck.latest_checkpoint(ckpt_dir)),
              "resolved_run": str(ck.resolve_checkpoint(os.path.dirname(ckpt_dir)))}
    try:
        ck.resolve_checkpoint(os.path.join(ckpt_dir, "step_000002"))
    except UserError as e:
        result["explicit_error"] = str(e)
    result["hashed"] = hashed
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
    # step_000002 (the newest, corrupt): each file hashed once, by one of the two ranks; step_000001 (the
    # fallback) by rank 0 alone; nothing hashed twice (the later calls reuse the digests and verdicts)
    step2 = {f"step_000002/{f.name}" for f in (tmp_path / "run" / "checkpoints" / "step_000002").iterdir()
             if f.name != ckpt.MANIFEST}
    h0, h1 = r0["hashed"], r1["hashed"]
    assert len(h0) == len(set(h0)) and len(h1) == len(set(h1))
    assert h1 and set(h1) <= step2 and not set(h0) & set(h1)
    assert set(h0) | set(h1) >= step2
    assert {h.split("/")[0] for h in h0} == {"step_000001", "step_000002"}


def test_save_splits_the_manifest_hashing_over_the_ranks_and_waits_for_the_work():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5, "meta.json": 1}
    shares = ckpt.split_shares(sizes, 2)
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    assert shares == [["a", "d"], ["b", "c", "meta.json"]]  # largest first to the least loaded
    assert ckpt.split_shares(sizes, 2) == shares  # every rank computes the same split
    big = {f"__{r}_0.distcp": 12_000_000_000 for r in range(8)}  # 8B + AdamW over 8 ranks: 12 GB each
    assert ckpt.hash_wait_s(big, 8) == 12e9 / ckpt.MIN_HASH_BYTES_PER_S + ckpt.HASH_WAIT_MARGIN_S
    assert ckpt.hash_wait_s(big, 1) > 8 * ckpt.hash_wait_s(big, 8) - 8 * ckpt.HASH_WAIT_MARGIN_S - 1
