"""S3 for real: moto's standalone S3 server on 127.0.0.1 (started once for the module), reached through
s3fs with an endpoint and fake credentials from the environment, as a user points lmforge at MinIO or
another S3-compatible store. ``prepare`` reads s3:// inputs and writes an s3:// shard dir (index.json
last, no overwrite without --overwrite); ``ShardLoader`` and ``pretrain`` stream s3:// shards through a
local cache, resumably."""

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import UserError
from lmforge.data.loader import ShardLoader
from lmforge.data.prepare import prepare
from lmforge.data.shards import read_index, verify_shards
from lmforge.tokenizer.train import train_tokenizer
from tests.conftest import TEST_DATA

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")
REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = TEST_DATA / "tinyshakespeare" / "input.txt"
BUCKET = "lmforge-test"


@pytest.fixture(scope="module")
def s3():
    """The endpoint URL; the env points s3fs (and every subprocess) at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    # moto keeps its buckets in process-wide state, shared by every server this process starts (another test
    # module reuses this fixture): start from an empty store
    urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"),
                           timeout=30).close()
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield env["AWS_ENDPOINT_URL"]
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(SHAKESPEARE)], 512, out, txt_mode="blank", progress=False)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, s3):
    """The same files locally and under s3://BUCKET/corpus/: small text files, a jsonl and a parquet file."""
    blocks = [b for b in SHAKESPEARE.read_text().split("\n\n") if len(b) > 200]
    local = tmp_path_factory.mktemp("corpus")
    for i, b in enumerate(blocks[:12]):
        (local / f"p{i:02d}.txt").write_text(b)
    (local / "p12.txt").write_text(blocks[0])  # a duplicate
    (local / "rest.jsonl").write_text("".join(json.dumps({"text": b}) + "\n" for b in blocks[12:350]))
    # what BigQuery's EXPORT DATA ... FORMAT=PARQUET writes: a parquet file with the text column
    pq.write_table(pa.table({"id": list(range(50)), "text": blocks[350:400]}), local / "export-000.parquet")
    fs = s3fs.S3FileSystem()
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{BUCKET}/corpus/{p.name}")
    return local


@pytest.fixture(scope="module")
def s3_shards(s3, tok_dir, corpus, tmp_path_factory):
    """s3:// inputs -> s3:// shard dir (2 local workers read the small files from S3 themselves)."""
    url = f"s3://{BUCKET}/shards/run1"
    report = prepare([f"s3://{BUCKET}/corpus"], tok_dir, url, workers=2, val_fraction=0.1, shard_tokens=4000,
                     progress=False)
    return url, report


def _objects(prefix):
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    return {p.rsplit("/", 1)[1]: size for p, size in fs.du(f"{BUCKET}/{prefix}", total=False).items()}


def test_prepare_s3_in_s3_out_equals_local(s3_shards, tok_dir, corpus, tmp_path):
    url, report = s3_shards
    local = prepare([str(corpus)], tok_dir, tmp_path / "local", val_fraction=0.1, shard_tokens=4000,
                    progress=False)
    assert report["files"] == 15 and report["removed_exact_duplicates"] == 1
    assert report["documents_kept"] == local["documents_kept"] == 400
    index, local_index = verify_shards(url), read_index(tmp_path / "local")  # remote sha256 checked too
    assert index["splits"] == local_index["splits"]
    objects = _objects("shards/run1")
    shards = [s for sp in index["splits"].values() for s in sp["shards"]]
    assert len(shards) > 3 and set(objects) == {"index.json", *(s["file"] for s in shards)}
    fs = s3fs.S3FileSystem()
    for s in shards:  # byte-identical to the local build
        assert fs.cat_file(f"{url}/{s['file']}") == (tmp_path / "local" / s["file"]).read_bytes()


@pytest.mark.slow
def test_ray_workers_read_s3_objects_and_write_s3_shards(s3_shards, tok_dir):
    """--engine ray: a local Ray cluster (started by prepare, inheriting the endpoint) whose workers read
    the small objects themselves; the same shards as the local engine."""
    import signal

    url, _ = s3_shards
    out = f"s3://{BUCKET}/shards/ray"
    sigterm = signal.getsignal(signal.SIGTERM)
    r = prepare([f"s3://{BUCKET}/corpus"], tok_dir, out, engine="ray", workers=2, val_fraction=0.1,
                shard_tokens=4000, progress=False)
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ray.init's own handler (exit 15) did not stay
    assert r["documents_kept"] == 400 and r["files"] == 15
    index, ref = verify_shards(out), read_index(url)
    assert index["splits"] == ref["splits"] and index["config"]["engine"] == "ray"


def test_s3_out_refuses_overwrite_then_replaces_and_drops_stale(s3, tok_dir, corpus):
    url = f"s3://{BUCKET}/shards/again"
    small = [str(corpus / "p01.txt"), str(corpus / "p02.txt")]
    prepare([f"s3://{BUCKET}/corpus"], tok_dir, url, shard_tokens=3000, progress=False)
    many = set(_objects("shards/again"))
    with pytest.raises(UserError, match="already holds .* object.*pass --overwrite"):
        prepare(small, tok_dir, url, progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the moto endpoint included
    p = _lmforge("prepare", "--input", *small, "--tokenizer", tok_dir, "--out", url, env=env)
    assert p.returncode == 2 and p.stderr.startswith(f"error: --out '{url}' already holds"), p.stderr
    assert "Traceback" not in p.stderr and set(_objects("shards/again")) == many
    prepare(small, tok_dir, url, overwrite=True, progress=False)
    now = _objects("shards/again")
    assert set(now) == {"index.json", "train_00000.bin"} and len(many) > len(now)  # stale shards removed
    assert read_index(url)["cleaning"]["documents_kept"] == 2
    with pytest.raises(UserError, match="overlaps the input"):
        prepare([f"s3://{BUCKET}/corpus"], tok_dir, f"s3://{BUCKET}/corpus/out", progress=False)
    with pytest.raises(UserError, match="is not a token-shard dir .index.json is missing"):
        read_index(f"s3://{BUCKET}/corpus")


def test_loader_streams_s3_shards_through_cache_and_resumes(s3_shards, tmp_path):
    url, _ = s3_shards
    kw = {"seq_len": 32, "global_batch": 4, "seed": 5}
    cache = tmp_path / "cache"
    a = ShardLoader(url, "train", cache_dir=cache, **kw)
    first = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    fourth = a.next_batch()
    assert a.remote.downloads >= 1 and all(b.shape == (4, 33) for b in first)
    # the same windows as reading a local copy of the shards
    local = Path(a.remote.dir)
    for s in a.index["splits"]["train"]["shards"]:
        a.remote.fetch(s["file"])
    ref = ShardLoader(local, "train", **kw)
    assert all(np.array_equal(ref.next_batch(), b) for b in first)
    # a resumed loader (new process, fresh cache) reads the same next window
    b = ShardLoader(url, "train", cache_dir=tmp_path / "fresh", **kw)
    b.load_state_dict(state)
    assert np.array_equal(b.next_batch(), fourth)
    # a second loader on the warm cache downloads nothing
    c = ShardLoader(url, "train", cache_dir=cache, **kw)
    [c.next_batch() for _ in range(4)]
    assert c.remote.downloads == 0
    # a shard changed on the store (same size) fails its checksum when fetched
    fs = s3fs.S3FileSystem()
    name = a.index["splits"]["train"]["shards"][0]["file"]
    blob = bytearray(fs.cat_file(f"{url}/{name}"))
    fs.copy(f"{url}/", f"s3://{BUCKET}/shards/corrupt/", recursive=True)
    fs.pipe_file(f"s3://{BUCKET}/shards/corrupt/{name}", bytes(blob[:-2] + bytes([blob[-2] ^ 1, blob[-1]])))
    with pytest.raises(UserError, match=f"shard s3://{BUCKET}/shards/corrupt/{name} is corrupt"):
        verify_shards(f"s3://{BUCKET}/shards/corrupt")
    bad = ShardLoader(f"s3://{BUCKET}/shards/corrupt", "train", cache_dir=tmp_path / "c2", **kw)
    with pytest.raises(UserError, match=f"shard s3://{BUCKET}/shards/corrupt/{name} is corrupt"):
        bad.remote.fetch(name)
    assert not any(p.name.endswith(".bin") for p in bad.remote.dir.iterdir())


def _lmforge(*args, env):
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    return p


@pytest.mark.slow
def test_pretrain_from_s3_then_resume(s3_shards, tmp_path):
    url, _ = s3_shards
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "LMFORGE_CACHE_DIR": str(tmp_path / "cache")}
    base = ["pretrain", "--json", "--config", REPO / "lmforge/recipes/pretrain/tiny.yaml", f"data.dir={url}",
            f"run.dir={tmp_path / 'run'}", "data.seq_len=32", "train.global_batch=4", "train.micro_batch=4",
            "train.threads=1", "eval.batches=0", "checkpoint.interval=2", "log.interval=1",
            "schedule.warmup_steps=1"]
    p = _lmforge(*base, "train.max_steps=2", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["step"] == 2
    assert any((tmp_path / "cache" / "shards").rglob("train_*.bin"))  # streamed through the default cache
    p = _lmforge(*base, "train.max_steps=4", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert steps == [1, 2, 3, 4] and json.loads(p.stdout)["tokens"] == 4 * 4 * 32
