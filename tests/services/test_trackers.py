"""Experiment trackers (lmforge.train.trackers) for real: MLflow against a local tracking server this module
starts (SQLite store, 127.0.0.1), W&B in offline mode read back from its own run file, and a tracker pointed
at a closed port, which warns once while training finishes. The pretraining runs go through the real CLI."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from _ports import free_port

from lmforge.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def lmforge(*args, env=None, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           **(env or {})}
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def shards(tmp_path_factory, make_tokenizer):
    """A small synthetic corpus -> tokenizer -> token shards with a validation split."""
    import random

    from lmforge.data.prepare import prepare

    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "red", "blue", "big", "small"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "." for _ in range(300)]
    d = tmp_path_factory.mktemp("trackdata")
    make_tokenizer(d, docs, vocab_size=300, name="tok")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare([str(d / "docs.jsonl")], d / "tok", d / "shards", val_fraction=0.1, progress=False)
    return d / "shards"


def pretrain_args(shards, run_dir, *extra):
    return ["pretrain", "--config", REPO / "lmforge/recipes/pretrain/tiny.yaml", f"data.dir={shards}", f"run.dir={run_dir}",
            "model.n_layers=1", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=2", "data.seq_len=32",
            "train.global_batch=4", "train.micro_batch=4", f"train.max_steps={STEPS}", "train.threads=1",
            "schedule.warmup_steps=1", "eval.interval=3", "eval.batches=2", "checkpoint.interval=0",
            "log.interval=2", "log.peak_tflops=1", "log.progress=false", *extra]


def jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def local_store(tmp_path, experiment: str) -> str:
    """An MLflow SQLite store in tmp_path with ``experiment`` created there (MLflow would otherwise put its
    artifacts in ./mlruns of the working directory); the trackers find and use the existing experiment."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=store).create_experiment(experiment, artifact_location=(tmp_path / "art").as_uri())
    return store


# ---- MLflow against a real tracking server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")  # an optional extra; `dev` installs it, so CI runs these
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "OMP_NUM_THREADS": "1"}
    log = open(d / "server.log", "w")  # noqa: SIM115 - open for the server's whole life; closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # a loaded 2-core machine takes a while to import MLflow's server
        while True:
            assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not come up:\n" + (d / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_mlflow_run_params_metrics_artifacts_and_resume(mlflow_server, shards, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    args = pretrain_args(shards, run_dir, f"log.mlflow.tracking_uri={mlflow_server}", "log.mlflow.experiment=trk",
                         "log.mlflow.run_name=tiny-mlflow", "log.mlflow.tags.team=nlp")
    # segment 1 stops on its time limit after one step (and checkpoints); segment 2 resumes in the same run dir
    first = lmforge(*args, "train.time_limit_minutes=0.00001", "--json", check=False)
    assert first.returncode == 124, first.stderr[-3000:]  # a time-limited stop exits 124 and writes no RUN/model
    assert json.loads(first.stdout)["stop_reason"] == "time_limit" and not (run_dir / "model").exists()
    second = lmforge(*args, "--json")
    result = json.loads(second.stdout)
    assert result["step"] == STEPS and result["resumed_from"]
    assert "warning" not in first.stderr + second.stderr

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("trk")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the resumed segment logged to the same tracking run
    run = runs[0]
    assert json.loads((run_dir / "trackers.json").read_text()) == {"mlflow": run.info.run_id}
    assert run.info.run_name == "tiny-mlflow" and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "nlp"
    params = run.data.params
    assert params["train.max_steps"] == str(STEPS) and params["data.seq_len"] == "32"
    assert params["model.dim"] == "32" and params["optim.betas"] == "[0.9, 0.95]"
    assert params["train.time_limit_minutes"] == "1e-05"  # a resumed run keeps the first segment's params

    # metrics equal metrics.jsonl row for row, across both segments (a stopped segment does not evaluate on
    # its way out: a preempted job has seconds to checkpoint, so evaluations are at steps 0, 3 and 6)
    rows = jsonl(run_dir / "metrics.jsonl")
    train = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    evals = {r["step"]: r["val_loss"] for r in rows if r["kind"] == "eval"}
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [0, 3, 6]
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/val_loss")}
    assert set(loss) == set(train) and all(loss[s] == pytest.approx(v, rel=1e-9) for s, v in train.items())
    assert set(val) == set(evals) and all(val[s] == pytest.approx(v, rel=1e-9) for s, v in evals.items())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [2, 4, 6]

    # artifacts: the config, the metrics, the report PNG and the final model dir, byte for byte
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "report.png", "model"} <= top
    dst = tmp_path / "download"
    dst.mkdir()
    model = Path(client.download_artifacts(run.info.run_id, "model", str(dst)))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (model / name).read_bytes() == (run_dir / "model" / name).read_bytes()
    png = Path(client.download_artifacts(run.info.run_id, "report.png", str(dst)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(dst))).read_text())
    assert cfg["train"]["max_steps"] == STEPS and cfg["log"]["mlflow"]["experiment"] == "trk"


@pytest.mark.slow
def test_unreachable_trackers_warn_once_each_and_training_finishes(shards, tmp_path):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    closed = free_port()  # nothing listens there
    run_dir = tmp_path / "run"
    env = {"WANDB_BASE_URL": f"http://127.0.0.1:{closed}", "WANDB_API_KEY": "0" * 40, "WANDB_DIR": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "wconfig"), "WANDB_CACHE_DIR": str(tmp_path / "wcache"),
           "WANDB_DATA_DIR": str(tmp_path / "wdata")}
    env.update({k: "" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    p = lmforge(*pretrain_args(shards, run_dir, f"log.mlflow.tracking_uri=http://127.0.0.1:{closed}",
                               "log.wandb.mode=online"), "--json", env=env)
    assert json.loads(p.stdout)["step"] == STEPS
    warnings = [line for line in p.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 2, p.stderr
    assert warnings[0].startswith("warning: log.mlflow: start failed (cannot reach the tracking server at "
                                  f"http://127.0.0.1:{closed}")
    assert warnings[1].startswith("warning: log.wandb: start failed (cannot reach the tracking server at "
                                  f"http://127.0.0.1:{closed}")
    assert "Traceback" not in p.stderr  # both messages come from the one-connect probe, not minutes of retries
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "trackers.json").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")  # SQLAlchemy's notes on MLflow's own store code
def test_a_failed_run_closes_its_tracking_run_as_failed(shards, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = local_store(tmp_path, "fails")  # MLflow's local store: no server needed for this one
    run_dir = tmp_path / "run"
    # an absurd lr without clipping makes every update non-finite: the run stops with exit 2 after two
    p = lmforge(*pretrain_args(shards, run_dir, "optim.lr=1e30", "optim.grad_clip=0", "train.max_nonfinite=2",
                               f"log.mlflow.tracking_uri={store}", "log.mlflow.experiment=fails"), check=False)
    assert p.returncode == 2 and "non-finite steps in a row" in p.stderr
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.get_metric_history(runs[0].info.run_id, "eval/val_loss")  # rows up to the failure arrived


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_sigterm_stop_closes_the_tracking_run_as_killed(shards, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store, run_dir = local_store(tmp_path, "stop"), tmp_path / "run"
    args = pretrain_args(shards, run_dir, "train.max_steps=100000", f"log.mlflow.tracking_uri={store}",
                         "log.mlflow.experiment=stop", "--json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").is_file() or '"kind": "train"' not in \
                (run_dir / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no rows"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]  # SIGTERM: checkpointed, exit 128 + 15, no RUN/model
    assert json.loads(out)["stop_reason"] == "signal" and not (run_dir / "model").exists()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert run.info.status == "KILLED"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl"} <= arts and "model" not in arts  # a stopped run ships no model


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_lora_finetune_uploads_the_merged_model_and_the_adapter(tmp_path, make_tokenizer):
    """Fine-tuning shares the Trainer; its recipe exports after fit() and then closes the tracking run."""
    pytest.importorskip("mlflow")
    import torch
    from mlflow import MlflowClient

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tasks.config import config_from_dict
    from lmforge.tasks.run import run as finetune

    lines = ["Say hello. Hello there.", "What is two plus two? Four.", "Name an animal. The quick brown fox."] * 10
    make_tokenizer(tmp_path, lines, vocab_size=300, name="tok")
    mcfg = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    base = save_model_dir(build_model(mcfg, seed=0), tmp_path / "base", tokenizer_dir=str(tmp_path / "tok"))
    sft = [{"instruction": "Say hello.", "input": "", "output": "Hello there."},
           {"instruction": "What is two plus two?", "input": "", "output": "Four."}] * 6
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    store, run_dir = local_store(tmp_path, "ft"), tmp_path / "ft"
    threads = torch.get_num_threads()
    try:
        res = finetune(config_from_dict({
            "run": {"dir": str(run_dir)}, "model": {"from": str(base)}, "finetune": {"mode": "lora"},
            "lora": {"rank": 2, "alpha": 4, "targets": ["wq", "wv"], "dropout": 0.0},
            "data": {"train": [str(tmp_path / "sft.jsonl")], "dev_fraction": 0.25, "seq_len": 32, "batching": "pack"},
            "train": {"global_batch": 2, "micro_batch": 2, "max_steps": 2, "device": "cpu", "threads": 1},
            "eval": {"interval": 1, "batch_size": 2},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0,
                    "mlflow": {"tracking_uri": store, "experiment": "ft", "tags": {"recipe": "lora"}}}}))
    finally:
        torch.set_num_threads(threads)
    assert res.model_dir and res.adapter_dir
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("ft").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["finetune.mode"] == "lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "report.png", Path(res.model_dir).name, Path(res.adapter_dir).name} <= top
    inside = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, Path(res.adapter_dir).name)}
    assert inside == {p.name for p in Path(res.adapter_dir).iterdir()}


# ---- W&B offline, read back from the run's own .wandb file -----------------------------------------------------
def read_wandb_records(path: Path):
    """The records of a .wandb run file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a wandb protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in this block for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    return records


@pytest.mark.slow
def test_wandb_offline_run_file(shards, tmp_path):
    pytest.importorskip("wandb")
    run_dir, wdir = tmp_path / "run", tmp_path / "wandb"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "WANDB_CACHE_DIR": str(tmp_path / "wcache"),
           "WANDB_DATA_DIR": str(tmp_path / "wdata"), "WANDB_CONFIG_DIR": str(tmp_path / "wconfig"),
           "WANDB_SILENT": "true"}
    p = lmforge(*pretrain_args(shards, run_dir, "log.wandb.project=lmf-test", "log.wandb.name=tiny-wandb",
                               "log.wandb.tags=[alpha,beta]"), "--json", env=env)
    result = json.loads(p.stdout)  # stdout is still one JSON object (W&B's console capture is off)
    assert result["step"] == STEPS

    files = list(wdir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    assert files[0].name == f"run-{run_id}.wandb"
    records = read_wandb_records(files[0])
    by_type = {}
    for rec in records:
        by_type.setdefault(rec.WhichOneof("record_type"), []).append(rec)

    run = by_type["run"][0].run
    assert run.project == "lmf-test" and run.display_name == "tiny-wandb" and list(run.tags) == ["alpha", "beta"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == STEPS and config["data"]["seq_len"] == 32

    history: dict[int, dict[str, float]] = {}
    for rec in by_type["history"]:
        items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
        history.setdefault(rec.history.step.num, {}).update(items)
    rows = jsonl(run_dir / "metrics.jsonl")
    for r in rows:
        if r["kind"] == "train":
            assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-9)
        if r["kind"] == "eval":
            assert history[r["step"]]["eval/val_loss"] == pytest.approx(r["val_loss"], rel=1e-9)

    saved = {f.path for rec in by_type.get("files", []) for f in rec.files.files}
    assert {"config.yaml", "metrics.jsonl", "report.png"} <= saved
    run_files = files[0].parent / "files"
    assert (run_files / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert yaml.safe_load((run_files / "config.yaml").read_text())["log"]["wandb"]["name"] == "tiny-wandb"

    arts = [rec.artifact for rec in by_type.get("artifact", [])]
    model = [a for a in arts if a.type == "model"]
    assert len(model) == 1 and model[0].name == f"model-{run_id}"
    entries = {e.path: e for e in model[0].manifest.contents}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(entries)
    assert entries["model.safetensors"].size == (run_dir / "model" / "model.safetensors").stat().st_size
    assert by_type["exit"][0].exit.exit_code == 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_two_ranks_track_once(shards, tmp_path):
    """torchrun, 2 gloo ranks: rank 0 alone opens the MLflow run and the W&B run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow import MlflowClient

    store, run_dir, wdir = local_store(tmp_path, "ranks"), tmp_path / "run", tmp_path / "wandb"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "WANDB_CACHE_DIR": str(tmp_path / "wcache"),
           "WANDB_DATA_DIR": str(tmp_path / "wdata"), "WANDB_CONFIG_DIR": str(tmp_path / "wconfig"),
           "WANDB_SILENT": "true"}
    args = pretrain_args(shards, run_dir, f"log.mlflow.tracking_uri={store}", "log.mlflow.experiment=ranks",
                         "log.wandb.project=ranks", "train.micro_batch=2", "--json")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "lmforge", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps == [2, 4, 6]  # each row once
    assert len(list(wdir.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert "warning" not in p.stderr


# ---- config and the warn-once rule (no server) --------------------------------------------------------------
def load(*overrides):
    from lmforge.train.config import load_config

    return load_config(None, ["data.dir=x", "model.preset=tiny", "train.global_batch=4", "train.max_steps=2",
                              *overrides])


def test_tracker_config_keys_and_errors():
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    cfg = load("log.mlflow.tracking_uri=http://127.0.0.1:5000", "log.mlflow.tags.team=nlp",
               "log.wandb.mode=offline", "log.wandb.tags=a,b")
    assert cfg.log.mlflow.experiment == "lmforge" and cfg.log.mlflow.tags == {"team": "nlp"}
    assert cfg.log.wandb.mode == "offline" and cfg.log.wandb.tags == ["a", "b"] and cfg.log.wandb.project == "lmforge"
    assert load().log.mlflow is None and load().log.wandb is None
    cases = {
        "log.mlflow.experimnt=x": "unknown config key 'log.mlflow.experimnt'; did you mean 'experiment'?",
        "log.mlflow.tracking_uri=http://:99999": "log.mlflow.tracking_uri='http://:99999' is not a valid server URL",
        "log.mlflow.experiment=": "log.mlflow.experiment is empty",
        "log.wandb.project=team/proj": "log.wandb.project='team/proj' must be a non-empty name without /",
        "log.wandb.mode=online2": "log.wandb.mode='online2' has the wrong type; expected 'online' | 'offline' | 'disabled'",
        f"log.wandb.tags=[{'x' * 65}]": "must be 1 to 64 characters long",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load(override)
        assert message in str(e.value), (override, str(e.value))


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log.wandb needs the wandb package: pip install 'lmforge\[wandb\]'"):
        load("log.wandb.project=p")


def test_failing_tracker_warns_once_and_goes_quiet(capsys, tmp_path):
    from lmforge.train.trackers import Tracker, Trackers

    class Flaky(Tracker):
        name, label = "flaky", "Flaky"

        def __init__(self):
            super().__init__()
            self.logged = []

        def _start(self, config, resume_id):
            self.run_id = "r1"

        def _log(self, step, values):
            self.logged.append((step, values))
            if step >= 2:
                raise RuntimeError("HTTP 503\nservice unavailable")

        def _artifacts(self, paths):
            raise AssertionError("a switched-off tracker must not be called")

        _finish = _artifacts

    t = Flaky()
    group = Trackers([t], tmp_path)
    group.start({"a": 1})
    group.log({"kind": "train", "step": 1, "loss": 2.5, "lr": 0.1, "note": "x", "flag": True})
    group.log({"kind": "event", "step": 1, "event": "start"})
    group.log({"kind": "eval", "step": 2, "val_loss": 2.0})
    group.log({"kind": "eval", "step": 3, "val_loss": 1.0})
    group.artifacts([tmp_path])
    group.finish("finished")
    assert t.logged == [(1, {"train/loss": 2.5, "train/lr": 0.1}), (2, {"eval/val_loss": 2.0})]
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: log.flaky: log failed (HTTP 503 service unavailable); training continues without Flaky"]
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"flaky": "r1"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")
def test_mlflow_resume_of_a_vanished_run_opens_a_new_one(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from lmforge.train.trackers import MLflowLogConfig, MLflowTracker

    store = local_store(tmp_path, "exp")
    first = MLflowTracker(MLflowLogConfig(tracking_uri=store, experiment="exp"), "seg")
    first.start({"train": {"max_steps": 4}})
    first.log({"kind": "train", "step": 2, "loss": 3.0})
    first.finish("killed")
    again = MLflowTracker(MLflowLogConfig(tracking_uri=store, experiment="exp"), "seg")
    again.start({"train": {"max_steps": 8}}, resume_id=first.run_id)  # same run, first params kept
    again.log({"kind": "train", "step": 4, "loss": 2.0})
    again.finish("finished")
    other = MLflowTracker(MLflowLogConfig(tracking_uri=store, experiment="exp"), "seg")
    other.start({"a": 1}, resume_id="0" * 32)  # no such run: a new one, no warning
    other.finish("finished")
    assert other.active is False and other.run_id not in (None, first.run_id)
    assert "warning" not in capsys.readouterr().err
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "4"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "train/loss")] == [(2, 3.0), (4, 2.0)]
    assert client.get_run(other.run_id).info.status == "FINISHED"


def test_only_rank_zero_tracks(tmp_path):
    pytest.importorskip("mlflow")
    cfg = load("log.mlflow.experiment=e")
    from lmforge.train.trackers import build_trackers

    assert [t.name for t in build_trackers(cfg.log, tmp_path, "n", enabled=True).trackers] == ["mlflow"]
    assert not build_trackers(cfg.log, tmp_path, "n", enabled=False)
