"""The dashboard's launch API against the real CLI: the planner's memory verdict for this machine before a
launch (``POST /api/launch/plan``), a finetune form refused with ``lmforge finetune --check``'s own message, and
a good finetune launched from a tiny model and stopped (SIGTERM: a checkpoint, then the exit)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    src = REPO / "tests" / "data" / "tinyshakespeare" / "input.txt"
    d = tmp_path_factory.mktemp("data")
    train_tokenizer([str(src)], 512, d / "tok", txt_mode="blank", progress=False)
    prepare([str(src)], d / "tok", d / "shards", val_fraction=0.05, txt_mode="blank", progress=False)
    return d / "shards"


def client(root, **kw):
    from starlette.testclient import TestClient

    from lmforge.dashboard.app import create_app

    return TestClient(create_app([str(root)], allow_launch=True, **kw), base_url="http://127.0.0.1")


def cli_error(*argv) -> str:
    out = subprocess.run([sys.executable, "-m", "lmforge", *argv], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 2, out
    return out.stderr.strip().removeprefix("error: ")


GOOD = {"data.seq_len": 64, "train.global_batch": 8, "train.micro_batch": 8}


def test_cli_check_flag(shards, tmp_path):
    run_dir = tmp_path / "r"
    out = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "pretrain/tiny", f"data.dir={shards}",
                          f"run.dir={run_dir}", "--check", "--json"], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)["config"]
    assert cfg["data"]["dir"] == str(shards) and cfg["run"]["dir"] == str(run_dir)
    assert not run_dir.exists()  # nothing trained or written
    assert "train.max_steps='x' has the wrong type" in cli_error("pretrain", "--config", "pretrain/tiny",
                                                                 "train.max_steps=x", "--check")


def test_plan_verdict_for_this_machine(shards, tmp_path):
    on = client(tmp_path)
    body = {"verb": "pretrain", "recipe": "pretrain/tiny", "name": "p", "overrides": {"data.dir": str(shards), **GOOD}}
    r = on.post("/api/launch/plan", json=body)
    assert r.status_code == 200, r.json()
    plan = r.json()
    assert plan["machine"]["device"] == "cpu" and plan["machine"]["memory_gb"] > 0.5
    m = plan["memory_gb"]
    assert plan["fits"] is True and m["weights"] > 0 and m["activations"] > 0 and m["optimizer"] > 0
    assert plan["verdict"].startswith("tiny pretrain, seq 64 x micro batch 8, fp32: weights ")
    assert plan["verdict"].endswith(f"GB of CPU RAM {plan['machine']['memory_gb']:g} GB -> fits")
    # a bigger micro batch needs more activation memory; a device too small is told so
    bigger = on.post("/api/launch/plan", json={**body, "overrides": {**body["overrides"], "train.micro_batch": 64,
                                                                      "train.global_batch": 64}}).json()
    assert bigger["memory_gb"]["activations"] > 4 * m["activations"]
    small = client(tmp_path, machine={"device": "cuda", "name": "tiny GPU", "memory_gb": 0.001})
    r = small.post("/api/launch/plan", json=body).json()
    assert r["fits"] is False and r["verdict"].endswith("GB of tiny GPU 0.001 GB -> does NOT fit")
    # a bad value: the CLI's own message, and the plan route is as guarded as the launch
    bad = on.post("/api/launch/plan", json={**body, "overrides": {"train.max_steps": "many"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == cli_error("pretrain", "--config", "pretrain/tiny", "train.max_steps=many")
    assert on.post("/api/launch/plan", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert list(tmp_path.iterdir()) == []  # planning starts and writes nothing


@pytest.fixture(scope="module")
def model_dir(shards, tmp_path_factory):
    """A tiny pretrained model dir (RUN/model of a 4-step pretrain)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", "pretrain/tiny", f"data.dir={shards}",
                    f"run.dir={run_dir}", "train.max_steps=4", *(f"{k}={v}" for k, v in GOOD.items()),
                    "train.threads=1", "eval.interval=1000", "log.progress=false", "log.peak_tflops=1",
                    "schedule.warmup_steps=0"],
                   cwd=REPO, env=env(), capture_output=True, timeout=600, check=True)
    return run_dir / "model"


@pytest.mark.slow
def test_finetune_refused_with_the_cli_message_planned_launched_and_stopped(model_dir, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"en_instruction": f"Say {w}.", "en_input": "", "en_output": f"{w} {w}."}) + "\n"
                            for w in ["hi", "thou", "art", "good", "king", "queen", "love", "night"] * 8))
    on = client(root)
    assert "finetune/sft" in on.get("/api/launch").json()["recipes"]
    keys = {f["key"]: f for f in on.get("/api/launch/fields", params={"recipe": "finetune/sft"}).json()["fields"]}
    assert keys["finetune.mode"]["value"] == "sft" and keys["train.micro_batch"]["type"] == "int"
    overrides = {"model.from": str(model_dir), "data.train": str(data), "data.seq_len": 64, "train.global_batch": 4,
                 "train.micro_batch": 4, "train.epochs": 1000, "train.threads": 1, "checkpoint.interval": 2,
                 "log.interval": 1, "eval.interval": 1000, "log.progress": "false"}
    body = {"verb": "finetune", "recipe": "finetune/sft", "name": "ft", "overrides": overrides}
    bad = on.post("/api/launch", json={**body, "overrides": {**overrides, "finetune.mode": "bogus"}})
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == cli_error(
        "finetune", "--config", "finetune/sft", *(f"{k}={v}" for k, v in overrides.items()), "finetune.mode=bogus",
        f"run.dir={root / 'ft'}")
    assert on.post("/api/launch", json={**body, "verb": "pretrain"}).status_code == 400  # a recipe of the other verb
    plan = on.post("/api/launch/plan", json=body)
    assert plan.status_code == 200, plan.json()
    assert plan.json()["mode"] == "full" and plan.json()["verdict"].startswith("model full, seq 64 x micro batch 4")
    assert plan.json()["fits"] is True
    started = on.post("/api/launch", json=body)
    assert started.status_code == 200, started.json()
    assert started.json()["command"].startswith("lmforge finetune --config finetune/sft ")
    run_dir = root / "ft"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "LATEST").is_file():
        assert time.monotonic() < deadline, (root / ".dashboard-logs" / "ft.log").read_text()[-3000:]
        time.sleep(0.5)
    rows = on.get("/api/runs").json()["runs"]
    assert next(r for r in rows if r["id"] == "0/ft")["stoppable"] is True
    assert on.post("/api/stop", json={"id": "0/ft"}).json()["signalled"] == "SIGTERM"
    deadline = time.monotonic() + 120
    while "exited" not in (out := on.post("/api/stop", json={"id": "0/ft"}).json()):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert out["exited"] != 0  # stopped early: 128 + SIGTERM
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "MANIFEST.json").is_file()
