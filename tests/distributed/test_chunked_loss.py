"""The chunked LM loss on 2 gloo ranks: under FSDP2 (the head's weight gathered by the root's hooks) and DDP it
takes the fused path, under tensor parallel (a vocabulary-sharded DTensor head) the unchunked fallback, and both
give the one-process loss and gradients of the whole logits."""

from __future__ import annotations

import json
from pathlib import Path

import _dist_harness as h
import pytest
import torch

pytestmark = pytest.mark.distributed

LAYOUTS = {"fsdp": {"dp_shard": 2}, "ddp": {"dp_replicate": 2, "dp_shard": 1}, "tp": {"tp": 2},
           "tp_nosp": {"tp": 2, "sequence_parallel": False}}
CHUNK = 5  # tokens per chunk: several chunks per rank (2 rows x 16 tokens)


def run_chunked(info, out_dir: str) -> None:
    """Spawned ranks: per layout, one forward/backward of CausalLMLoss(chunk=CHUNK, z_loss) on this rank's rows."""
    import torch.distributed as dist

    import lmforge.train.losses as loss_mod
    from lmforge.distributed.apply import parallelize
    from lmforge.distributed.config import ParallelConfig
    from lmforge.distributed.world import world_for
    from lmforge.models.transformer import build_model
    from lmforge.train.losses import CausalLMLoss

    paths: list[str] = []
    real = loss_mod.head_path
    loss_mod.head_path = lambda head: paths.append(real(head)) or paths[-1]
    cfg = h.model_config("tiny")
    tokens = h.batches(cfg.vocab_size, steps=1)[0]  # (4, 17)
    for name, spec in LAYOUTS.items():
        paths.clear()
        pcfg = ParallelConfig(**spec)
        world = world_for(pcfg, info.device)
        model = build_model(cfg, seed=0)
        parallelize(model, pcfg, world, device=info.device)
        mine = tokens.chunk(world.dp_size)[world.dp_rank]
        loss, n = CausalLMLoss(chunk=CHUNK, z_loss=1e-3)(model, mine)
        loss.backward()
        total = torch.stack([loss.detach(), n.float()])
        if world.dp_size > 1:
            dist.all_reduce(total)
        grads = h.full_grads(model)
        if info.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in grads.items()}, str(Path(out_dir) / f"{name}.safetensors"))
            Path(out_dir, f"{name}.json").write_text(json.dumps(
                {"loss": float(total[0]), "n": float(total[1]), "paths": sorted(set(paths)), "dp": world.dp_size}))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunked")
    h.spawn(2, "test_chunked_loss:run_chunked", out_dir=str(out))
    return out


@pytest.mark.parametrize("name,path", [("fsdp", "fused"), ("ddp", "fused"), ("tp", "unchunked"),
                                       ("tp_nosp", "unchunked")])
def test_parallel_chunked_loss_matches_one_process_whole_logits(results, name, path):
    from safetensors.torch import load_file

    from lmforge.models.transformer import build_model
    from lmforge.train.losses import CausalLMLoss

    got = json.loads((results / f"{name}.json").read_text())
    assert got["paths"] == [path]
    cfg = h.model_config("tiny")
    model = build_model(cfg, seed=0)
    tokens = h.batches(cfg.vocab_size, steps=1)[0]
    loss, n = CausalLMLoss(chunk=0, z_loss=1e-3)(model, tokens)  # one process, whole logits
    loss.backward()
    assert got["n"] == float(n)
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    grads = load_file(str(results / f"{name}.safetensors"))
    for k, p in model.named_parameters():
        # FSDP2 / DDP average gradients over the data-parallel ranks; each rank's loss is a sum over its rows
        torch.testing.assert_close(grads[k], p.grad / got["dp"], rtol=1e-4, atol=1e-6, msg=k)
