"""`lmforge dashboard` as a real server on 127.0.0.1 (a subprocess) over run dirs the tests write.

The runs list and its statuses, a run's checkpoints, bad input (garbage lines, a path out of the roots, a
symlink out of them), a big metrics file downsampled, compare with its config diff, and the live stream: a
writer appends rows with the trainer's own MetricsWriter (and rewrites the file on a resume, as the trainer
does) while a client reads the server-sent events; every row arrives once and in order."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from _ports import free_port

from lmforge.train.metrics import MetricsWriter

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 120


def get(url: str, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def q(**params) -> str:
    return urllib.parse.urlencode(params, doseq=True)


def train(step, loss):
    return {"kind": "train", "step": step, "tokens": 128 * step, "loss_tokens": 128 * step, "lr": 1e-3,
            "loss": loss, "grad_norm": 1.0, "tok_per_s": 256.0, "mfu": 0.1, "step_time": 0.5, "mem_gb": 0.1}


def write_run(d: Path, steps: int, end: str | None, lr: float = 1e-3, evals=((2, 3.0), (4, 2.5))):
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(f"run:\n  name: {d.name}\nmodel:\n  preset: tiny\n  dim: 32\noptim:\n  lr: {lr}\n")
    w = MetricsWriter(d)
    w.write({"kind": "event", "step": 0, "event": "start", "total_steps": steps, "time": 1.0})
    for s in range(1, steps + 1):
        w.write(train(s, 4.0 - 0.1 * s))
        for at, val in evals:
            if at == s:
                w.write({"kind": "eval", "step": s, "tokens": 128 * s, "val_loss": val, "val_bpb": val / 3,
                         "val_loss/web": val + 0.1})
    if end:
        w.write({"kind": "event", "step": steps, "event": "end", "reason": end, "elapsed_s": 1.0, "time": 2.0})
    return d


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("dash")
    root = base / "runs"
    write_run(root / "done", 6, "max_steps")
    write_run(root / "sub" / "halted", 4, "signal", lr=3e-3)
    crashed = write_run(root / "crashed", 3, None)
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write("garbage line\n{\"kind\": \"train\", \"st")  # a garbage line and a line cut by a kill
    live = root / "live"
    live.mkdir()
    (live / ".lmforge.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "command": "lmforge pretrain", "started": "2026-12-07T20:00:00Z"}))
    write_run(base / "outside", 2, "max_steps")
    ck = root / "done" / "checkpoints" / "step_000006"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"complete": True}))
    (ck / ".metadata").write_bytes(b"x" * 10)
    (ck / "MANIFEST.json").write_text(json.dumps({"format": 1, "files": {
        "meta.json": {"size": (ck / "meta.json").stat().st_size, "sha256": "0"},
        ".metadata": {"size": 10, "sha256": "0"}}}))
    (root / "done" / "checkpoints" / "LATEST").write_text("step_000006\n")
    samples = root / "done" / "completions"  # GRPO's sample generations
    samples.mkdir()
    rows = [{"step": 2, "prompt": f"What is {i}+{i}?", "answer": str(2 * i), "completion": f"It is {2 * i}.",
             "reward": 1.0, "rewards": {"answer": 1.0}, "advantage": 0.5 - i} for i in range(3)]
    rows[2]["completion"] = "x" * 10000  # clipped for the page
    (samples / "step_000002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "garbage\n")
    with open(samples / "step_000004.jsonl", "w") as f:  # over the read bound: the first rows only
        f.write("".join(json.dumps({**rows[0], "step": 4, "prompt": f"p{i}" * 500}) + "\n" for i in range(3000)))
    (samples / "notes.txt").write_text("not a samples file")
    (samples / "step_000009.jsonl").symlink_to(base / "outside" / "config.yaml")  # a link out: never listed or read
    big = root / "big"
    big.mkdir()
    with open(big / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(train(s, 5.0 / s)) + "\n" for s in range(1, 60001)))
    outside = base / "outside"  # written before the link above points into it
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def server(roots, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "dashboard.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "dashboard", "--runs", str(roots),
                                 "--port", str(port)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmforge dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if get(url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmforge dashboard did not answer within {WAIT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def runs_by_name(server):
    status, body = get(server + "/api/runs")
    assert status == 200, body
    return {r["id"]: r for r in body["runs"]}


def test_runs_list(server):
    runs = runs_by_name(server)
    assert set(runs) == {"0/done", "0/sub/halted", "0/crashed", "0/live", "0/big"}  # not the symlink out
    done = runs["0/done"]
    assert done["status"]["state"] == "finished" and done["model"] == "tiny dim=32"
    assert done["step"] == 6 and done["total_steps"] == 6 and done["tokens"] == 768
    assert done["last_eval"]["val_loss"] == 2.5 and done["best"]["val_loss"] == {"value": 2.5, "step": 4}
    assert done["best"]["val_bpb"]["value"] == pytest.approx(2.5 / 3) and done["disk_bytes"] > 0
    halted = runs["0/sub/halted"]["status"]
    assert halted["state"] == "stopped" and "resume" in halted["reason"]
    crashed = runs["0/crashed"]
    assert crashed["status"]["state"] == "failed" and "killed or crashed" in crashed["status"]["reason"]
    assert crashed["bad_lines"] == 1 and crashed["step"] == 3  # the cut last line is not counted yet
    live = runs["0/live"]["status"]
    assert live["state"] == "running" and live["pid"] == os.getpid()


def test_run_detail_checkpoints(server):
    status, run = get(server + "/api/run?" + q(id="0/done"))
    assert status == 200
    assert run["checkpoints"] == [{"name": "step_000006", "step": 6, "bytes": run["checkpoints"][0]["bytes"],
                                   "verified": True, "problem": None, "latest": True}]
    assert [e["event"] for e in run["events"]] == ["start", "end"]
    assert run["config"]["optim"]["lr"] == 1e-3


def test_paths_outside_the_roots_are_refused(server):
    for name, code in (("0/../outside", 403), ("0/escape", 403), ("0/sub/../../outside", 403),
                       ("3/done", 404), ("0/nothere", 404), ("/etc", 404)):
        for route in ("run", "series", "stream"):
            status, body = get(server + f"/api/{route}?" + q(id=name))
            assert status == code, (route, name, body)
            assert "error" in body
    status, _ = get(server + "/api/file?" + q(id="0/done", name="../../outside/config.yaml"))
    assert status == 404


def test_big_metrics_file_is_downsampled(server):
    for _ in range(100):  # the server reads a bounded amount per request; ask until the whole file is read
        status, body = get(server + "/api/series?" + q(id="0/big"))
        assert status == 200
        if body["indexed"]:
            break
    assert body["indexed"] and body["summary"]["step"] == 60000
    train_s = body["series"]["train"]
    assert train_s["rows_seen"] == 60000 and len(train_s["x"]["step"]) <= 4001
    assert train_s["x"]["step"][-1] == 60000 and train_s["y"]["loss"][-1] == pytest.approx(5.0 / 60000)


def test_sample_generations(server):
    status, run = get(server + "/api/run?" + q(id="0/done"))
    assert status == 200 and [(f["name"], f["step"]) for f in run["samples"]] == [
        ("completions/step_000002.jsonl", 2), ("completions/step_000004.jsonl", 4)]
    status, body = get(server + "/api/samples?" + q(id="0/done"))
    assert status == 200 and body["files"] == run["samples"]
    status, body = get(server + "/api/samples?" + q(id="0/done", name="completions/step_000002.jsonl"))
    assert status == 200 and body["bad_lines"] == 1 and not body["truncated"]
    assert [r["completion"][:8] for r in body["rows"]] == ["It is 0.", "It is 2.", "xxxxxxxx"]
    assert body["rows"][0]["rewards"] == {"answer": 1.0} and body["rows"][1]["advantage"] == -0.5
    assert len(body["rows"][2]["completion"]) < 4100 and body["rows"][2]["completion"].endswith("more characters)")
    status, body = get(server + "/api/samples?" + q(id="0/done", name="completions/step_000004.jsonl"))
    assert status == 200 and body["truncated"] and 0 < len(body["rows"]) <= 200
    assert all(r["step"] == 4 for r in body["rows"])
    for name in ("completions/step_000009.jsonl", "../outside/config.yaml", "completions/notes.txt", "config.yaml",
                 "/etc/passwd"):
        status, body = get(server + "/api/samples?" + q(id="0/done", name=name))
        assert status == 404 and "not a samples file" in body["error"]["message"], name
    status, body = get(server + "/api/samples?" + q(id="0/escape"))
    assert status == 403
    status, body = get(server + "/api/samples?" + q(id="0/crashed"))
    assert status == 200 and body["files"] == []


def test_compare_and_config_diff(server):
    status, body = get(server + "/api/compare?" + q(id=["0/done", "0/sub/halted"]))
    assert status == 200
    keys = {d["key"]: d for d in body["config_diff"]}
    assert set(keys) == {"run.name", "optim.lr"}  # model.preset and model.dim are the same: not shown
    assert keys["optim.lr"]["values"] == {"0/done": 1e-3, "0/sub/halted": 3e-3}
    assert set(body["series"]) == {"0/done", "0/sub/halted"}
    assert body["series"]["0/done"]["eval"]["y"]["val_loss/web"] == [3.1, 2.6]
    status, body = get(server + "/api/compare?" + q(id=["0/done", "0/../outside"]))
    assert status == 403


def read_stream(url: str, rows: list, stop: threading.Event, resets: list):
    """Follow the stream like the page does: rows in order; on reset, start over from the file's beginning."""
    params = {"id": "0/writer", "offset": 0}
    while not stop.is_set():
        rows.clear()
        last_line = -1
        with urllib.request.urlopen(url + "/api/stream?" + q(**params), timeout=60) as r:
            event = None
            for raw in r:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "rows":
                    for row in json.loads(line[6:])["rows"]:
                        assert row["_line"] > last_line  # once and in order
                        last_line = row["_line"]
                        rows.append(row)
                elif line.startswith("data: ") and event == "reset":
                    resets.append(time.monotonic())
                    break
                if stop.is_set():
                    return


def test_live_stream_every_row_once_in_order_across_a_resume(server, roots):
    run = roots / "writer"
    run.mkdir()
    w = MetricsWriter(run)
    w.write({"kind": "event", "step": 0, "event": "start", "total_steps": 40, "time": 1.0})
    rows, resets, stop = [], [], threading.Event()
    reader = threading.Thread(target=read_stream, args=(server, rows, stop, resets), daemon=True)
    reader.start()
    try:
        for s in range(1, 21):
            w.write(train(s, 1.0 / s))
            time.sleep(0.02)
        deadline = time.monotonic() + 30
        while len(rows) < 21 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.get("step") for r in rows] == list(range(21))
        w.truncate_after(12)  # a resume from step 12: the file is rewritten with the rows up to it
        w.write({"kind": "event", "step": 12, "event": "resume", "total_steps": 40, "time": 2.0})
        for s in range(13, 41):
            w.write(train(s, 0.5 / s))
        expected = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        deadline = time.monotonic() + 30
        while (not resets or len(rows) < len(expected)) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
    assert resets, "the rewrite on resume sent no reset event"
    got = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    assert got == expected  # every row of the file once, in order (steps 0..12, the resume event, 13..40)
    assert [r["_line"] for r in rows] == list(range(len(expected)))


def test_api_key_and_host_guard(roots):
    from starlette.testclient import TestClient

    from lmforge.dashboard.app import create_app

    keyed = TestClient(create_app([str(roots)], api_key="k-123"), base_url="http://127.0.0.1")
    assert keyed.get("/api/runs").status_code == 401
    assert keyed.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert keyed.get("/api/runs", headers={"Authorization": "Bearer k-123"}).status_code == 200
    assert keyed.get("/").status_code == 200  # the page itself is open; it asks for the key
    open_ = TestClient(create_app([str(roots)]), base_url="http://evil.example")
    r = open_.get("/api/runs")  # DNS rebinding: a foreign Host without a key is refused
    assert r.status_code == 403 and "loopback" in r.json()["error"]["message"]


def test_cli_refuses_bad_flags_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LMFORGE_API_KEY", None)
    for args, words in ((["--runs", str(tmp_path / "nope")], "is not a directory"),
                        (["--runs", str(tmp_path), "--host", "0.0.0.0"], "--api-key"),
                        (["--runs", str(tmp_path), "--port", "70000"], "not a port")):
        p = subprocess.run([sys.executable, "-m", "lmforge", "dashboard", *args], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
        assert words in p.stderr


def test_launch_refusals(roots, tmp_path):
    from starlette.testclient import TestClient

    from lmforge.dashboard.app import create_app

    off = TestClient(create_app([str(roots)]), base_url="http://127.0.0.1")
    assert off.get("/api/launch").json() == {"allowed": False, "recipes": []}
    r = off.post("/api/launch", json={"recipe": "pretrain/tiny", "name": "x"})
    assert r.status_code == 403 and "--allow-launch" in r.json()["error"]["message"]
    r = off.post("/api/launch/plan", json={"recipe": "pretrain/tiny", "name": "x"})
    assert r.status_code == 403 and "--allow-launch" in r.json()["error"]["message"]
    on = TestClient(create_app([str(tmp_path)], allow_launch=True), base_url="http://127.0.0.1")
    assert "pretrain/tiny" in on.get("/api/launch").json()["recipes"]
    keys = {f["key"]: f for f in on.get("/api/launch/fields", params={"recipe": "pretrain/tiny"}).json()["fields"]}
    assert keys["train.max_steps"]["type"] == "int" and "optim.lr" in keys
    # a cross-site form post (not JSON) or a foreign Origin is refused before anything runs
    assert on.post("/api/launch", data={"recipe": "pretrain/tiny"}).status_code == 403
    assert on.post("/api/launch", json={"recipe": "pretrain/tiny", "name": "x"},
                   headers={"Origin": "http://evil.example"}).status_code == 403
    for body, words in (({"recipe": "pretrain/tiny", "name": "../up"}, "run name"),
                        ({"recipe": "../../etc/passwd", "name": "x"}, "unknown recipe"),
                        ({"recipe": "pretrain/tiny", "name": "x", "overrides": {"run.dir": "/tmp/y"}}, "run.dir"),
                        ({"recipe": "pretrain/tiny", "name": "x", "overrides": {"optim.lr": "fast"}}, "optim.lr"),
                        ({"verb": "eval", "recipe": "pretrain/tiny", "name": "x"}, "cannot be launched")):
        r = on.post("/api/launch", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.json())
    assert list(tmp_path.iterdir()) == []  # nothing was started or written
    write_run(tmp_path / "notmine", 2, None)
    r = on.post("/api/stop", json={"id": "0/notmine"})
    assert r.status_code == 409 and "not launched by this dashboard" in r.json()["error"]["message"]


@pytest.mark.slow
def test_a_200mb_metrics_file_answers_within_a_bound_downsampled(tmp_path):
    """A 200 MB metrics.jsonl (1.4M rows of the trainer's shape, a resume's repeated steps included): every
    /api/series answer comes within a bound while the file is still being indexed (each request reads for at
    most its budget), and the series stay downsampled to a few thousand points."""
    from starlette.testclient import TestClient

    from lmforge.dashboard.app import create_app

    run = tmp_path / "runs" / "huge"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run:\n  name: huge\n")
    row = json.dumps(train(1, 1.0)).replace('"step": 1,', '"step": %d,').replace('"loss": 1.0,', '"loss": %.9g,')
    target, step, written = 200 << 20, 0, 0
    with open(run / "metrics.jsonl", "w") as f:
        while f.tell() < target:
            block = "".join(row % (s, 5.0 / s) + "\n" for s in range(step + 1, step + 10001))
            if step == 500000:  # a resume from step 400000 writes steps again (the reader keeps the rows in order)
                block += "".join(row % (s, 4.0 / s) + "\n" for s in range(400001, 410001))
                written += 10000
            f.write(block)
            step, written = step + 10000, written + 10000
    size = (run / "metrics.jsonl").stat().st_size
    assert size >= target
    client = TestClient(create_app([str(tmp_path / "runs")], budget_s=0.5), base_url="http://127.0.0.1")
    answers, start = [], time.monotonic()
    while True:
        t0 = time.monotonic()
        r = client.get("/api/series", params={"id": "0/huge"})
        answers.append(time.monotonic() - t0)
        assert r.status_code == 200
        body = r.json()
        n = len(body["series"]["train"]["x"]["step"])
        assert 0 < n <= 4001, n  # downsampled, whatever was read so far
        if body["indexed"]:
            break
        assert time.monotonic() - start < 600, f"indexed {body['cursor']['offset']} of {size} bytes in 10 minutes"
    assert len(answers) > 1 and max(answers[:-1]) < 10, answers  # answered while indexing, each within the bound
    train_s = body["series"]["train"]
    assert train_s["rows_seen"] == written and train_s["x"]["step"][-1] == step
    assert train_s["y"]["loss"][-1] == pytest.approx(5.0 / step, rel=1e-4)
    assert body["summary"]["step"] == step and body["size"] == size
    runs = client.get("/api/runs").json()["runs"]  # the runs list stays quick on the indexed file
    assert [r["id"] for r in runs] == ["0/huge"] and runs[0]["step"] == step
