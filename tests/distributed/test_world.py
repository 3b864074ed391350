"""The World and its collectives: a tensor on a device its group's backend does not reduce is refused with
one line (NCCL takes CUDA tensors only: a CPU tensor there fails only on the GPU machine); no tensor
collective in the package bypasses the checked wrappers; the process group lmforge creates is destroyed
at exit after its last run; a launcher that gives each rank one visible GPU (CUDA_VISIBLE_DEVICES per
rank) is accepted.

The 4-rank mesh layout is tested in test_dist_config.py, sharded gradient accumulation in
test_dist_accumulation.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import _dist_harness as h
import pytest
import torch
import torch.distributed as dist

import lmforge
from lmforge.config import UserError
from lmforge.distributed import collectives
from lmforge.distributed.config import ParallelConfig
from lmforge.distributed.process_group import all_reduce_mean, cuda_device
from lmforge.distributed.world import World, setup_world, world_for


@pytest.fixture
def pg():
    """A one-rank gloo process group in this process (made by the test, as a harness would)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{h.free_port()}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_tensor_on_another_device_than_the_groups_is_refused(pg, monkeypatch):
    world = world_for(ParallelConfig(), "cpu")
    t = torch.tensor([1.0, 2.0])
    assert world.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]  # cpu on gloo: fine
    assert all_reduce_mean(2.5) == 2.5  # a Python scalar is made a tensor on the group's device
    with pytest.raises(collectives.CollectiveDeviceError,
                       match=r"^all_reduce over a gloo process group got a tensor on meta \(\(3,\), torch.float32\); "
                             r"gloo needs cpu tensors"):
        world.all_reduce_sum(torch.zeros(3, device="meta"))
    # what NCCL expects, checked on gloo: every wrapper refuses the CPU tensor before the backend sees it
    monkeypatch.setattr(collectives, "expected_device_types", lambda group=None: frozenset({"cuda"}))
    for call in (lambda: world.all_reduce_sum(torch.ones(2, dtype=torch.float64)),
                 lambda: world.all_reduce(torch.ones(2), "max", over="world"),
                 lambda: collectives.gather(torch.ones(2), [torch.ones(2)], dst=0),
                 lambda: collectives.scatter(torch.ones(2), [torch.ones(2)], src=0)):
        with pytest.raises(collectives.CollectiveDeviceError, match=r"got a tensor on cpu .*needs cuda tensors"):
            call()


def test_backend_devices(monkeypatch):
    for backend, want in (("nccl", {"cuda"}), ("gloo", {"cpu"}), ("cpu:gloo,cuda:nccl", {"cpu", "cuda"})):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collectives.expected_device_types() == want


TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter",
                      "reduce_scatter_tensor", "gather", "scatter", "reduce", "all_to_all", "all_to_all_single",
                      "send", "recv", "isend", "irecv", "new_group", "new_subgroups", "init_device_mesh"}
ALLOWED = {"distributed/collectives.py": TENSOR_COLLECTIVES - {"new_group", "new_subgroups", "init_device_mesh"},
           "distributed/world.py": {"init_device_mesh", "new_group"}}  # World's mesh; side_group()


def _dist_names(tree: ast.AST) -> set[str]:
    """Local names bound to torch.distributed (``import torch.distributed as dist``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
    return names


def test_every_tensor_collective_goes_through_the_checked_wrappers():
    """A direct ``dist.all_reduce`` (or a group / mesh made outside the World) anywhere else in lmforge/ fails."""
    root = Path(lmforge.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        dist_names = _dist_names(tree)
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                base = ast.unparse(node.func.value)
                if base in dist_names or base == "torch.distributed":
                    name = node.func.attr
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                name = next((a.name for a in node.names if a.name in TENSOR_COLLECTIVES), None)
            if name in TENSOR_COLLECTIVES and name not in ALLOWED.get(rel, set()):
                found.append(f"lmforge/{rel}:{node.lineno}: {name}")
    assert not found, "tensor collectives outside lmforge/distributed/collectives.py:\n" + "\n".join(found)


def test_the_scan_sees_a_direct_collective(tmp_path):
    tree = ast.parse("import torch.distributed as dist\ndef f(t):\n    dist.all_reduce(t)\n")
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and ast.unparse(n.func.value) in _dist_names(tree)]
    assert calls == ["all_reduce"]


def test_one_visible_gpu_per_rank_is_cuda_0(monkeypatch):
    """torchrun-style LOCAL_RANK with CUDA_VISIBLE_DEVICES set per rank (each process sees one GPU)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cuda_device(3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert cuda_device(3) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"^LOCAL_RANK=3 but only 2 CUDA devices are visible; use --nproc_per_node "
                                        r"<= 2, or give each rank one device with CUDA_VISIBLE_DEVICES$"):
        cuda_device(3)


def test_a_group_lmforge_created_is_destroyed_at_exit_after_its_last_run(pg, monkeypatch):
    import atexit

    from lmforge.distributed import process_group

    world, device = setup_world("cpu")  # the harness's group exists: the World uses it and leaves it alone
    assert not world.owns_group and world.distributed and device.type == "cpu"
    world.close()
    assert dist.is_initialized() and not world.distributed
    dist.destroy_process_group()
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(h.free_port())}.items():
        monkeypatch.setenv(key, value)
    registered = []
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    world, _ = setup_world("cpu", ParallelConfig(timeout_s=60))  # as under torchrun: lmforge creates it
    assert world.owns_group and dist.is_initialized() and world.dp_size == 1 and len(registered) == 1
    fn, args = registered[0]
    fn(*args)  # the interpreter exits in the middle of a run (it failed): the group is left alone
    assert dist.is_initialized()
    world.close()
    again, _ = setup_world("cpu", ParallelConfig(timeout_s=60))  # a second run in the process reuses it
    assert not again.owns_group and again.distributed and len(registered) == 1
    again.close()
    fn(*args)  # exit after the last run ended: destroyed
    assert not dist.is_initialized() and process_group.current().backend is None
    assert World().dp_rank == 0 and World().all_reduce_sum(torch.ones(1)).tolist() == [1.0]  # one plain process


@pytest.mark.distributed
def test_pretrain_runs_under_torchrun_share_the_group_and_destroy_it_at_exit(tmp_path):
    import yaml

    data = h.write_token_dir(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(h.trainer_config_dict(tmp_path / "run", data, 2)))
    code = ("import sys, torch.distributed as dist\n"
            "from lmforge.train.config import load_config\n"
            "from lmforge.tasks.run import run\n"
            "real = dist.destroy_process_group\n"
            "dist.destroy_process_group = lambda *a: print('destroyed', flush=True) or real(*a)\n"
            "for name in ('a', 'b'):\n"
            "    result = run(load_config(sys.argv[1], [f'run.dir={sys.argv[2]}/{name}'])).train\n"
            "    print('step', result.step, 'initialized', dist.is_initialized(), flush=True)\n")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(h.free_port()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(cfg), str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith(("step", "destroyed"))]
    assert lines == ["step 2 initialized True", "step 2 initialized True", "destroyed"], out.stdout
