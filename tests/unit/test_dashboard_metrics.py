"""The dashboard's incremental metrics reader (lmforge.dashboard.metrics) and run-dir helpers, without a server."""

import json
import os

import pytest

from lmforge.dashboard.metrics import MAX_LINE_BYTES, MetricsReader
from lmforge.dashboard.runs import Refused, Roots, config_diff, status
from lmforge.train.metrics import MetricsWriter


def train_row(step, loss=1.0):
    return {"kind": "train", "step": step, "tokens": 64 * step, "lr": 0.1, "loss": loss, "step_time": 0.5}


def test_reads_only_new_complete_lines_and_counts_garbage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(train_row(1)) + "\nnot json\n[1, 2]\n" + json.dumps(train_row(2))[:20])
    r = MetricsReader(path)
    rows = r.read()
    assert [row["step"] for row in rows] == [1]
    assert r.cursor.bad == 2 and r.cursor.line == 3  # the half-written last line is left for later
    with open(path, "a") as f:  # the writer finishes its line and adds one
        f.write(json.dumps(train_row(2))[20:] + "\n" + json.dumps(train_row(3)) + "\n")
    rows = r.read()
    assert [(row["step"], row["_line"]) for row in rows] == [(2, 3), (3, 4)]
    assert r.read() == []  # nothing new: nothing reread
    assert rows[-1]["_t"] == pytest.approx(1.5)  # 3 steps of 0.5 s


def test_over_long_line_is_skipped_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"x" * (MAX_LINE_BYTES + 10) + b"\n" + json.dumps(train_row(1)).encode() + b"\n")
    r = MetricsReader(path)
    rows = []
    for _ in range(5):
        rows += r.read(max_bytes=1 << 16)
    assert [row["step"] for row in rows] == [1] and r.cursor.bad == 1


def test_downsampling_bounds_points_and_keeps_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(train_row(s, loss=1.0 / s)) + "\n" for s in range(1, 5001)))
    r = MetricsReader(path, max_points=100)
    while r.read(max_bytes=1 << 16):
        pass
    s = r.series()["train"]
    assert len(s["x"]["step"]) <= 201 and s["x"]["step"][-1] == 5000 and s["rows_seen"] == 5000
    assert s["x"]["step"] == sorted(s["x"]["step"])  # in order
    assert s["y"]["loss"][-1] == pytest.approx(1 / 5000)


def test_resume_rewrite_is_seen_as_replaced(tmp_path):
    w = MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.write(train_row(s))
    r = MetricsReader(tmp_path / "metrics.jsonl")
    assert len(r.read()) == 5 and not r.replaced()
    w.truncate_after(3)  # what the trainer does on resume: an atomic rewrite with the rows up to step 3
    assert r.replaced()
    r.restart()
    assert [row["step"] for row in r.read()] == [1, 2, 3]


def test_status_from_end_events_and_lock(tmp_path):
    assert status(tmp_path, {"end": {"reason": "max_steps"}, "segments": 1})["state"] == "finished"
    st = status(tmp_path, {"end": {"reason": "signal"}, "segments": 1})
    assert st["state"] == "stopped" and "resume" in st["reason"]
    assert status(tmp_path, {"end": {"reason": "diverged"}, "segments": 1})["state"] == "failed"
    assert status(tmp_path, {"end": None, "segments": 1})["state"] == "failed"
    import socket

    (tmp_path / ".lmforge.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                        "command": "lmforge pretrain"}))
    st = status(tmp_path, {"end": None, "segments": 1})
    assert st["state"] == "running" and st["pid"] == os.getpid()


def test_roots_refuse_escapes(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (root / "a" / "metrics.jsonl").write_text("")
    outside.mkdir()
    (outside / "metrics.jsonl").write_text("")
    (root / "link").symlink_to(outside)
    roots = Roots([root])
    assert [n for n, _ in roots.discover()] == ["0/a"]  # the symlink is not followed
    assert roots.resolve("0/a") == (root / "a").resolve()
    for name, code in (("0/../outside", 403), ("0/link", 403), ("1/a", 404), ("0/missing", 404), ("x", 404)):
        with pytest.raises(Refused) as e:
            roots.resolve(name)
        assert e.value.status == code, name


def test_config_diff_only_differing_keys():
    diff = config_diff({"a": {"optim": {"lr": 1e-3, "wd": 0.1}, "seed": 1},
                        "b": {"optim": {"lr": 3e-3, "wd": 0.1}}})
    assert [(d["key"], d["missing"]) for d in diff] == [("optim.lr", []), ("seed", ["b"])]
