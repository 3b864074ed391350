"""``prepare --engine ray`` on a real local Ray cluster (started once for the module): byte-identical shards
and index to ``--engine local``, dedup across workers equal to the one-process result, the CLI joining a
cluster by address, and a worker's bad-input error surfacing as the same one-line error."""

import json
import os
import subprocess
import sys

import pytest

import lmforge.data.prepare as prepare_mod
from lmforge.data.prepare import prepare
from lmforge.data.shards import verify_shards
from lmforge.tokenizer.train import train_tokenizer
from tests.conftest import TEST_DATA

ray = pytest.importorskip("ray")
SHAKESPEARE = TEST_DATA / "tinyshakespeare" / "input.txt"
TIMING = ("seconds", "mb_per_s", "tokens_per_s")


@pytest.fixture(scope="module")
def cluster():
    from lmforge.data.ray_engine import keep_signal_handlers

    with keep_signal_handlers():  # later tests in this process expect the default SIGTERM handler
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(SHAKESPEARE)], 512, out, progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Small text files (each its own task) and a jsonl streamed in batches, with exact and near
    duplicates placed in *different* tasks, so only a corpus-wide dedup finds them."""
    blocks = [b for b in SHAKESPEARE.read_text().split("\n\n") if len(b) > 400][:40]
    src = tmp_path_factory.mktemp("corpus")
    for i, b in enumerate(blocks[:20]):
        (src / f"a{i:02d}.txt").write_text(b)
    (src / "a20.txt").write_text(blocks[3].upper())  # exact duplicate (after normalization) of a03
    near = blocks[5].replace(" the ", " thy ", 2).replace("you", "thou", 1)
    rows = blocks[20:] + [blocks[7], near, blocks[25]]  # a07 again, a05 nearly, a row of this file again
    (src / "b.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return src


def _strip(index):
    index = json.loads(json.dumps(index))
    for key in ("engine", "workers"):
        index["config"].pop(key)
    for key in TIMING:
        index["cleaning"].pop(key)
    return index


def test_ray_engine_matches_local_byte_for_byte(tmp_path, cluster, tok_dir, corpus, monkeypatch):
    monkeypatch.setattr(prepare_mod, "TASK_BYTES", 1)  # one task per small file
    monkeypatch.setattr(prepare_mod, "SMALL_FILE", 4000)  # b.jsonl is streamed as batches of documents
    kw = {"val_fraction": 0.2, "dedup": "near", "seed": 3, "progress": False, "shard_tokens": 3000}
    local = prepare([str(corpus)], tok_dir, tmp_path / "local", engine="local", workers=1, **kw)
    onray = prepare([str(corpus)], tok_dir, tmp_path / "ray", engine="ray", workers=2, **kw)
    i_local, i_ray = verify_shards(tmp_path / "local"), verify_shards(tmp_path / "ray")
    assert i_ray["config"]["engine"] == "ray" and i_local["config"]["engine"] == "local"
    assert _strip(i_local) == _strip(i_ray)
    files = [s["file"] for split in ("train", "val") for s in i_local["splits"][split]["shards"]]
    assert len(files) > 4 and i_local["splits"]["val"]["documents"] > 0
    for name in files:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    # duplicates across tasks (and so across workers) are removed exactly as in one process
    assert local["removed_exact_duplicates"] == onray["removed_exact_duplicates"] == 3
    assert local["removed_near_duplicates"] == onray["removed_near_duplicates"] == 1
    assert onray["documents_kept"] == 40


def test_cli_joins_cluster_by_address_and_reports_worker_errors_in_one_line(tmp_path, cluster, tok_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("a document that is long enough to keep")
    (bad / "x.jsonl").write_text('{"text": "fine enough text here"}\n{not json\n')
    cmd = [sys.executable, "-m", "lmforge", "prepare", "--input", str(bad), "--tokenizer", str(tok_dir),
           "--out", str(tmp_path / "never"), "--engine", "ray", "--ray-address", cluster, "--no-progress"]
    # x.jsonl is read by a Ray worker of the cluster this test started: one line, exit 2, nothing written
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "x.jsonl:2 is not valid JSON" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "never").exists()


def test_engine_flags_are_checked(tmp_path, tok_dir, corpus):
    from lmforge.config import UserError

    with pytest.raises(UserError, match="--engine='spark' is not one of local, ray"):
        prepare([str(corpus)], tok_dir, tmp_path / "x", engine="spark", progress=False)
    with pytest.raises(UserError, match="--ray-address needs --engine ray"):
        prepare([str(corpus)], tok_dir, tmp_path / "y", ray_address="auto", progress=False)
    with pytest.raises(UserError, match="--ray-address=127.0.0.1:1: nothing answers there"):
        prepare([str(corpus)], tok_dir, tmp_path / "z", engine="ray", ray_address="127.0.0.1:1", progress=False)
    assert not any((tmp_path / n).exists() for n in "xyz")
