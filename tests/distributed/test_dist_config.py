"""ParallelConfig / ParallelDims: resolution, validation messages (key + fix); the World's rank layout on 4 gloo
ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.config import ConfigError, from_dict
from lmforge.distributed.config import ParallelConfig, ParallelDims
from lmforge.models.presets import get_preset


def dims(world, **kw):
    return ParallelDims.from_config(ParallelConfig(**kw), world)


def test_dp_shard_fills_the_world():
    assert dims(8) == ParallelDims(1, 8, 1, 8)
    assert dims(8, tp=2) == ParallelDims(1, 4, 2, 8)
    assert dims(16, dp_replicate=2, tp=2) == ParallelDims(2, 4, 2, 16)
    assert dims(1) == ParallelDims(1, 1, 1, 1)


@pytest.mark.parametrize("world,kw,wrapper", [
    (8, {}, "fsdp"), (8, {"dp_replicate": 2}, "hsdp"), (2, {"dp_replicate": 2, "dp_shard": 1}, "ddp"),
    (2, {"tp": 2}, "none"), (1, {}, "none"),
])
def test_wrapper_choice(world, kw, wrapper):
    assert dims(world, **kw).data_parallel == wrapper


def test_product_must_equal_world_size():
    with pytest.raises(ConfigError, match=r"dp_replicate=1 x dp_shard=3 x tp=2 = 6 != world size 8; set "
                                          r"parallel.dp_shard=-1"):
        dims(8, dp_shard=3, tp=2)
    with pytest.raises(ConfigError, match=r"parallel.dp_replicate=1 x parallel.tp=3 = 3 does not divide the world "
                                          r"size 8.*divisors: 1, 2, 4, 8"):
        dims(8, tp=3)


@pytest.mark.parametrize("kw,msg", [
    ({"tp": 0}, "parallel.tp=0 must be >= 1"),
    ({"dp_shard": 0}, "parallel.dp_shard=0 must be >= 1, or -1"),
    ({"dp_replicate": 0}, "parallel.dp_replicate=0 must be >= 1"),
    ({"timeout_s": 0}, "parallel.timeout_s=0 must be > 0"),
])
def test_bad_values_name_the_key(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ParallelConfig(**kw)


def test_yaml_section_types_and_typos():
    cfg = from_dict(ParallelConfig, {"tp": "2", "activation_checkpoint": "selective", "compile": "true"})
    assert cfg.tp == 2 and cfg.compile is True
    with pytest.raises(ConfigError, match="activation_checkpoint='some'.*'none', 'full', 'selective', 'matmuls', "
                                          "'layer-N'"):
        from_dict(ParallelConfig, {"activation_checkpoint": "some"}, prefix="parallel")
    for name in ("matmuls", "layer-2"):
        assert from_dict(ParallelConfig, {"activation_checkpoint": name}).activation_checkpoint == name
    with pytest.raises(ConfigError, match="activation_checkpoint='layer-0'"):
        from_dict(ParallelConfig, {"activation_checkpoint": "layer-0"}, prefix="parallel")
    with pytest.raises(ConfigError, match="unknown config key 'parallel.tensor_parallel'"):
        from_dict(ParallelConfig, {"tensor_parallel": 2}, prefix="parallel")


def test_tp_must_divide_heads_kv_heads_and_widths():
    llama3 = get_preset("llama3-8b")  # 32 heads, 8 kv heads
    dims(8, tp=8).check_model(llama3)
    with pytest.raises(ConfigError, match=r"parallel.tp=16 does not divide model.n_kv_heads=8"):
        dims(16, tp=16).check_model(llama3)
    tiny = get_preset("tiny")  # 4 heads, 2 kv heads
    with pytest.raises(ConfigError, match=r"parallel.tp=4 does not divide model.n_kv_heads=2; use a tp that divides "
                                          r"it \(e.g. 1, 2\)"):
        dims(4, tp=4).check_model(tiny)
    gpt2 = get_preset("gpt2-124m")  # vocab 50257 (odd)
    with pytest.raises(ConfigError, match=r"model.vocab_size=50257.*or pad it: model.vocab_size=50258"):
        dims(2, tp=2).check_model(gpt2)


LAYOUTS_4 = {"tp": {"tp": 2}, "hsdp": {"dp_replicate": 2}, "ddp_tp": {"dp_replicate": 2, "dp_shard": 1, "tp": 2}}


@pytest.mark.distributed
def test_world_mesh_layout_on_four_ranks(tmp_path):
    """The real World on 4 gloo ranks: which ranks share a TP group, a data-parallel group (for the loss
    sums: a one-hot all-reduce shows who was summed) and an FSDP/DDP mesh; tp is the fastest dimension and
    dp_rank (the batch slice a rank reads) is the same for TP peers and distinct within a dp group."""
    import json

    import _dist_harness as h

    h.spawn(4, "_trainer_jobs:world_layout", out=str(tmp_path), layouts=LAYOUTS_4)
    got = {}
    for rank in range(4):
        for name, row in json.loads((tmp_path / f"layout_rank{rank}.json").read_text()).items():
            got.setdefault(name, []).append(row)
    tp = got["tp"]  # (dp_replicate, dp_shard, tp) = (1, 2, 2)
    assert [r["tp_group"] for r in tp] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp_group"] for r in tp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp_rank"] for r in tp] == [0, 0, 1, 1] and [r["tp_rank"] for r in tp] == [0, 1, 0, 1]
    assert [r["dp_sum"] for r in tp] == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]
    assert [r["fsdp_mesh"] for r in tp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(r["dp_size"] == 2 and r["world_sum"] == [1, 1, 1, 1] for r in tp)
    hsdp = got["hsdp"]  # (2, 2, 1): FSDP2 shards inside a replica, replicas are {0, 1} and {2, 3}
    assert [r["fsdp_mesh"] for r in hsdp] == [[[0, 1], [2, 3]]] * 4
    assert [r["ddp_group"] for r in hsdp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp_group"] for r in hsdp] == [[0, 1, 2, 3]] * 4
    assert [r["dp_rank"] for r in hsdp] == [0, 1, 2, 3] and [r["dp_sum"] for r in hsdp] == [[1, 1, 1, 1]] * 4
    ddp_tp = got["ddp_tp"]  # (2, 1, 2): the replicas are the dp ranks
    assert [r["tp_group"] for r in ddp_tp] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["ddp_group"] for r in ddp_tp] == [r["dp_group"] for r in ddp_tp] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["dp_rank"] for r in ddp_tp] == [0, 0, 1, 1]


def test_config_import_does_not_import_torch():
    code = "import sys, lmforge.distributed.config as d; d.ParallelConfig(); import lmforge.train.config; " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
