"""Checkpoints are data, never code, and trusted only after checks (issue 11, items 1 and 8).

Each hostile payload is first shown to be live (plain ``pickle``/DCP would run it and create a file),
then lmforge's path is shown to refuse it with a one-line error and no side effect."""

import io
import json
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from lmforge.config import UserError
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import OptimConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import find_resume

CFG = get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64)


class CreatesFile:
    """Unpickling this opens (creates) ``path`` for writing: a stand-in for any code an attacker runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _model_opt():
    model = build_model(CFG, seed=0)
    return model, build_optimizer(model, OptimConfig(lr=1e-2))


def _saved(tmp_path, steps=(1,)):
    model, opt = _model_opt()
    mgr = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=5)
    paths = [mgr.save(s, model, opt, {"tokens": s}, {"loader": {"pos": s}}) for s in steps]
    return mgr, paths


def _load_fresh(mgr, path):
    model, opt = _model_opt()
    return mgr.load(path, model, opt)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_save_writes_a_manifest_of_every_file_last(tmp_path):
    _, (path,) = _saved(tmp_path)
    files = json.loads((path / "MANIFEST.json").read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {"MANIFEST.json"}
    assert {"meta.json", ".metadata", "rank_00000.json"} <= set(files)
    assert files["meta.json"]["size"] == (path / "meta.json").stat().st_size
    assert ckpt.verify_checkpoint(path) is None


def test_metadata_pickle_payload_is_refused_without_running(tmp_path):
    mgr, (path,) = _saved(tmp_path)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(CreatesFile(control)))
    assert control.exists()  # the payload is live under a plain unpickler
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    with pytest.raises(UserError) as e:
        _load_fresh(mgr, path)
    assert "refusing" in _one_line(e) and "open" in str(e.value)
    assert not marker.exists()
    with pytest.raises(CheckpointException, match="refusing"):  # DCP's own entry point, lmforge's reader
        dcp.load({"model": build_model(CFG).state_dict()}, storage_reader=ckpt.SafeReader(str(path)))
    assert not marker.exists()
    ckpt.write_manifest(path)  # an attacker can rewrite the manifest too: it proves integrity, not origin
    with pytest.raises(UserError, match="refusing"):  # the index is read (restricted) when picking a checkpoint
        ckpt.resolve_checkpoint(path)
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None
    with pytest.raises(UserError):
        _load_fresh(mgr, path)
    assert not marker.exists()


def test_distcp_byte_entry_is_never_unpickled(tmp_path):
    mgr, (path,) = _saved(tmp_path)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(CreatesFile(marker), buf)
    (path / "__0_1.distcp").write_bytes(buf.getvalue())
    md = pickle.loads((path / ".metadata").read_bytes())
    fqn = "model.tok_embeddings.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo("__0_1.distcp", 0, len(buf.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(md))

    with pytest.raises(UserError) as e:
        _load_fresh(mgr, path)
    assert "pickled object" in _one_line(e) and fqn in str(e.value)
    assert not marker.exists()

    # Second line of defence: even DCP's unchecked reader cannot make lmforge's planner unpickle it.
    target = {"model": {"tok_embeddings.weight": torch.zeros(64, 32)}}
    with pytest.raises(CheckpointException, match="pickled object"):
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(path)), planner=ckpt.SafeLoadPlanner())
    assert not marker.exists()
    # ... while DCP's default planner would run it: the payload is live.
    dcp.load({"model": {"tok_embeddings.weight": torch.zeros(64, 32)}}, storage_reader=dcp.FileSystemReader(str(path)),
             planner=DefaultLoadPlanner())
    assert marker.exists()


def test_index_pointing_outside_the_checkpoint_is_refused(tmp_path):
    mgr, (path,) = _saved(tmp_path)
    md = pickle.loads((path / ".metadata").read_bytes())
    key = next(iter(md.storage_data))
    md.storage_data[key] = _StorageInfo("../../etc/passwd", 0, 10)
    (path / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UserError) as e:
        _load_fresh(mgr, path)
    assert "outside" in _one_line(e)


@pytest.mark.parametrize("victim", ["rank_00000.json", ".metadata", "__0_0.distcp", "meta.json"])
def test_truncated_newest_checkpoint_falls_back_and_names_it(tmp_path, capsys, victim):
    mgr, paths = _saved(tmp_path, steps=(1, 2))
    f = paths[-1] / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    ckpt_dir = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(ckpt_dir) == paths[0]
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_000002" in err and victim in err and "truncated" in err
    assert find_resume(tmp_path, "auto") == paths[0]
    assert ckpt.resolve_checkpoint(tmp_path) == paths[0]
    meta, rank_state = _load_fresh(mgr, paths[0])
    assert meta["step"] == 1 and rank_state == {"loader": {"pos": 1}}
    with pytest.raises(UserError) as e:  # asked for by name: refused, with the reason
        ckpt.resolve_checkpoint(paths[-1])
    assert victim in _one_line(e)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path, capsys):
    _, paths = _saved(tmp_path, steps=(1, 2))
    f = paths[-1] / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert ckpt.is_complete(paths[-1])  # sizes alone cannot see it ...
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == paths[0]  # ... the sha256 does
    assert "sha256" in capsys.readouterr().err


def test_checkpoint_without_manifest_does_not_count(tmp_path):
    _, paths = _saved(tmp_path, steps=(1, 2))
    (paths[-1] / "MANIFEST.json").unlink()
    assert not ckpt.is_complete(paths[-1])
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == paths[0]


def test_truncated_files_loaded_directly_give_one_line_errors(tmp_path):
    mgr, (path,) = _saved(tmp_path)
    for name in ("__0_0.distcp", ".metadata", "rank_00000.json"):
        f = path / name
        original = f.read_bytes()
        f.write_bytes(original[: len(original) // 2])
        with pytest.raises(UserError) as e:
            _load_fresh(mgr, path)
        assert name in _one_line(e) or "truncated" in str(e.value)
        f.write_bytes(original)
    _load_fresh(mgr, path)  # restored: loads again
