"""`checkpoint.async` in one process: the background save snapshots the state at the call, LATEST moves only
once it is complete, a second save waits for the first, a failed background save is reported where the run
waits (LATEST untouched); digests taken while writing; retention with `checkpoint.keep_every`."""

import hashlib
import io
import json
import threading

import pytest
import torch

from lmforge.config import ConfigError, to_dict
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import OptimConfig, load_config
from lmforge.train.optim import build_optimizer

CFG = get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64)


def _trained(steps=1):
    model = build_model(CFG, seed=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def gate(monkeypatch):
    """Holds every background shard write until released (a slow disk under our control)."""
    ev = threading.Event()
    real = ckpt.HashingWriter.write_data

    def write_data(self, plan, planner):
        assert ev.wait(30)
        return real(self, plan, planner)

    monkeypatch.setattr(ckpt.HashingWriter, "write_data", write_data)
    return ev


def test_async_save_snapshots_the_state_and_publishes_latest_when_complete(tmp_path, gate):
    model, opt = _trained()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3, async_save=True)
    mgr.save(1, model, opt, {"tokens": 1}, {})
    gate.set()
    mgr.wait()
    gate.clear()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = mgr.save(2, model, opt, {"tokens": 2}, {"loader": {"pos": 3}})
    assert mgr.in_flight and (tmp_path / ".tmp_step_000002").is_dir() and not path.exists()
    assert (tmp_path / "LATEST").read_text().strip() == "step_000001"  # the write is held: LATEST stays
    with torch.no_grad():  # training goes on and changes the weights while the save is in flight
        for p in model.parameters():
            p.add_(1.0)
    gate.set()
    assert mgr.wait() >= 0 and not mgr.in_flight
    assert (tmp_path / "LATEST").read_text().strip() == "step_000002"
    assert ckpt.verify_checkpoint(path) is None
    fresh = build_model(CFG, init=False)
    meta, rank_state = mgr.load(path, fresh, build_optimizer(fresh, OptimConfig(lr=1e-2)))
    assert meta["step"] == 2 and rank_state == {"loader": {"pos": 3}}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]), k  # the state at the call, not the one after it
    # the host copy's buffers are reused from save to save: step 1 still holds step 1's state
    mgr.load(tmp_path / "step_000001", fresh, build_optimizer(fresh, OptimConfig(lr=1e-2)))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, first[k]), k
    mgr.close()
    assert mgr._staging is None


def test_a_second_save_waits_for_the_one_in_flight(tmp_path, gate):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3, async_save=True)
    mgr.save(1, model, opt, {"tokens": 1}, {})
    threading.Timer(0.5, gate.set).start()
    mgr.save(2, model, opt, {"tokens": 2}, {})  # blocks until the first is written
    assert mgr.last_wait_s >= 0.4 and mgr.last_stall_s >= mgr.last_wait_s
    assert ckpt.verify_checkpoint(tmp_path / "step_000001") is None
    mgr.wait()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]


def test_a_failed_background_save_is_raised_where_the_run_waits_and_latest_stays(tmp_path, monkeypatch):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3, async_save=True)
    mgr.save(1, model, opt, {"tokens": 1}, {})
    mgr.wait()

    def full_disk(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.HashingWriter, "write_data", full_disk)
    mgr.save(2, model, opt, {"tokens": 2}, {})
    with pytest.raises(ckpt.CheckpointError, match="step_000002 was not saved.*No space left") as e:
        mgr.wait()
    assert "\n" not in str(e.value)
    assert (tmp_path / "LATEST").read_text().strip() == "step_000001"
    assert not (tmp_path / "step_000002").exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"


@pytest.mark.parametrize("async_save", [False, True])
def test_the_manifest_comes_from_digests_taken_while_writing(tmp_path, monkeypatch, async_save):
    model, opt = _trained()
    read_back = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda p: read_back.append(p.name) or real(p))
    mgr = ckpt.CheckpointManager(tmp_path, async_save=async_save)
    path = mgr.save(1, model, opt, {"tokens": 1}, {"x": 1})
    mgr.wait()
    assert read_back == []  # nothing was read back to hash it
    files = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    assert {"__0_0.distcp", ".metadata", "meta.json", "rank_00000.json"} == set(files)
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_hashing_stream_counts_what_was_written_and_refuses_to_seek():
    raw = io.BytesIO()
    s = ckpt._HashingStream(raw)
    s.write(b"abc")
    s.write(memoryview(torch.arange(4, dtype=torch.int32).numpy()))
    assert s.size == 3 + 16 and s.tell() == 19
    assert s.hexdigest() == hashlib.sha256(raw.getvalue()).hexdigest()
    with pytest.raises(io.UnsupportedOperation):
        s.seek(0)


def test_keep_set_is_the_last_k_plus_every_nth():
    steps = [100, 200, 300, 400, 500, 600, 700]
    assert ckpt.keep_set(steps, 2, 0) == {600, 700}
    assert ckpt.keep_set(steps, 2, 300) == {300, 600, 700}
    assert ckpt.keep_set(steps, 1, 200) == {200, 400, 600, 700}


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_every_keeps_every_nth_step_forever(tmp_path, async_save):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2, keep_every=3, async_save=async_save)
    for step in range(1, 9):
        mgr.save(step, model, opt, {"tokens": step}, {})
    mgr.wait()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 6, 7, 8]
    # LATEST pointing at an old step (a re-save after a resume) is never deleted, whatever the rule says
    (tmp_path / "LATEST").write_text("step_000007\n")
    mgr.keep_last, mgr.keep_every = 1, 0
    mgr.prune()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [7, 8]


def test_prune_never_touches_the_checkpoint_being_written(tmp_path, gate):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=1, async_save=True)
    gate.set()
    mgr.save(1, model, opt, {"tokens": 1}, {})
    mgr.wait()
    gate.clear()
    mgr.save(2, model, opt, {"tokens": 2}, {})  # held in flight
    mgr.prune()  # e.g. a prune while it is written: the temp dir and LATEST's checkpoint stay
    assert (tmp_path / ".tmp_step_000002").is_dir() and (tmp_path / "step_000001").is_dir()
    gate.set()
    mgr.wait()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]


def test_config_spells_async_as_in_yaml(tmp_path):
    base = {"data": {"dir": str(tmp_path)}, "model": {"preset": "tiny"},
            "train": {"global_batch": 2, "max_steps": 2}}
    cfg = load_config(None, ["checkpoint.async=true", "checkpoint.keep_every=1000"], base=base)
    assert cfg.checkpoint.async_ is True and cfg.checkpoint.keep_every == 1000
    dumped = to_dict(cfg)["checkpoint"]
    assert dumped["async"] is True and "async_" not in dumped
    assert load_config(None, base={**base, "checkpoint": dumped}).checkpoint.async_ is True  # config.yaml round trip
    assert load_config(None, base=base).checkpoint.async_ is False
    with pytest.raises(ConfigError, match="checkpoint.keep_every=-1 must be >= 0"):
        load_config(None, ["checkpoint.keep_every=-1"], base=base)
    with pytest.raises(ConfigError, match="unknown config key 'checkpoint.asynch'; did you mean 'async'"):
        load_config(None, ["checkpoint.asynch=true"], base=base)
    with pytest.raises(ConfigError, match="checkpoint.async='maybe' must be true or false"):
        load_config(None, ["checkpoint.async=maybe"], base=base)



def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        mgr.save(step, model, opt, {"tokens": step}, {})
    real = ckpt.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        first = min(ckpt.Path(path).iterdir()) if ckpt.Path(path).is_dir() else None
        if first is not None:
            first.unlink()  # one file gone, then the process dies
            raise SystemExit(137)
        real(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    mgr.keep_last = 1
    with pytest.raises(SystemExit):
        mgr.prune()
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    for p in tmp_path.glob("step_*"):  # step_000001 went whole (renamed away first), the rest verify
        assert ckpt.verify_checkpoint(p) is None, p
    assert not (tmp_path / "step_000001").exists() and (tmp_path / ".trash_step_000001").is_dir()
    mgr.clean_partial()
    assert not (tmp_path / ".trash_step_000001").exists()
