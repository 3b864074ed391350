"""The byte caps, bad-file rule and hand-back of expanding file groups (issue 22) hold the same under
``--engine ray``: Ray workers read the small files themselves, with the caps carried in the task config."""

import gzip
import json

import pytest

import lmforge.data.prepare as prepare_mod
from lmforge.config import UserError
from lmforge.data.prepare import prepare

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow
CAP = 2000


@pytest.fixture(scope="module")
def cluster():
    from lmforge.data.ray_engine import keep_signal_handlers

    with keep_signal_handlers():  # later tests in this process expect the default SIGTERM handler
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, [f"plain words number {i} for a small tokenizer." for i in range(200)], vocab_size=300)
    return d / "out"


def _inputs(root):
    """Small gzip files (grouped into worker tasks), each with good lines and one line over CAP; one cut."""
    root.mkdir()
    for i in range(4):
        lines = [f"file {i} line {j}: plain words for a small tokenizer, number {i * 100 + j}" for j in range(60)]
        lines.insert(7, "x" * (CAP + 1))
        (root / f"f{i}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n"
                                                                    for t in lines).encode()))
    data = (root / "f0.jsonl.gz").read_bytes()
    (root / "f9_cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    return root


def _same(a, b):
    skip = {"seconds", "mb_per_s", "tokens_per_s"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_ray_and_local_apply_the_same_caps_and_bad_file_rule(tmp_path, tok, cluster, monkeypatch):
    inp = _inputs(tmp_path / "in")
    with pytest.raises(UserError, match=r"f9_cut\.jsonl\.gz' cannot be read: it is truncated"):
        prepare([str(inp)], tok, tmp_path / "r0", progress=False, engine="ray", ray_address=cluster,
                workers=2, max_doc_bytes=CAP)
    kw = {"progress": False, "max_doc_bytes": CAP, "skip_bad_files": True}
    local = prepare([str(inp)], tok, tmp_path / "l", **kw)
    on_ray = prepare([str(inp)], tok, tmp_path / "r", engine="ray", ray_address=cluster, workers=2, **kw)
    _same(local, on_ray)
    assert local["skipped_too_large"] >= 4 and [b["file"] for b in local["bad_files"]] == [
        str(inp / "f9_cut.jsonl.gz")]
    assert (tmp_path / "l" / "train_00000.bin").read_bytes() == (tmp_path / "r" / "train_00000.bin").read_bytes()
    # groups that expand past the limit are handed back by the Ray workers and streamed by the driver
    monkeypatch.setattr(prepare_mod, "FILES_TASK_TEXT", 1000)
    streamed = []
    real = prepare_mod._doc_tasks
    monkeypatch.setattr(prepare_mod, "_doc_tasks", lambda *a: streamed.append(a[0]) or real(*a))
    handed_back = prepare([str(inp)], tok, tmp_path / "h", engine="ray", ray_address=cluster, workers=2, **kw)
    _same(local, handed_back)
    assert sorted(streamed) == sorted(str(p) for p in inp.iterdir())  # every group was handed back
    assert (tmp_path / "h" / "train_00000.bin").read_bytes() == (tmp_path / "l" / "train_00000.bin").read_bytes()
