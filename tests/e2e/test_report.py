"""`lmforge report RUN`: figures computed from metrics.jsonl, a PNG and a markdown summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def lmforge(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def write_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    cfg = {"run": {"dir": str(run_dir), "name": "demo"}, "model": {"preset": "tiny", "vocab_size": 512},
           "data": {"dir": "shards", "seq_len": 64}, "train": {"global_batch": 8, "max_steps": 40},
           "optim": {"lr": 0.003}, "schedule": {"name": "cosine"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"kind": "event", "step": 0, "event": "start", "total_steps": 40},
            {"kind": "eval", "step": 0, "tokens": 0, "val_loss": 6.2, "val_ppl": 492.7, "val_bpb": 4.1}]
    for step in range(10, 41, 10):
        rows.append({"kind": "train", "step": step, "tokens": step * 512, "loss": 6.0 - step / 20,
                     "lr": 0.003 * (1 - step / 50), "grad_norm": 1.0, "tok_per_s": 1000.0 * step,
                     "mfu": step / 100, "step_time": 0.1, "mem_gb": 0.3, "peak_mem_gb": 0.25 + step / 100})
        if step == 20:
            rows.append({"kind": "event", "step": 20, "event": "end", "reason": "signal", "elapsed_s": 30.0})
            rows.append({"kind": "event", "step": 20, "event": "resume", "total_steps": 40})
        if step % 20 == 0:
            rows.append({"kind": "eval", "step": step, "tokens": step * 512, "val_loss": 5.0 - step / 40,
                         "val_ppl": 100.0, "val_bpb": 3.0})
    rows.append({"kind": "event", "step": 40, "event": "nonfinite", "loss": "nan"})
    rows.append({"kind": "event", "step": 40, "event": "end", "reason": "max_steps", "elapsed_s": 45.0})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "step": 41, "lo'  # torn last line
    (run_dir / "metrics.jsonl").write_text(text)


def test_report_figures_png_and_markdown(tmp_path):
    run_dir = tmp_path / "demo"
    write_run(run_dir)
    p = lmforge("report", run_dir, "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["steps"] == 40 and s["total_steps"] == 40 and s["tokens"] == 40 * 512
    assert s["first_loss"] == 5.5 and s["final_loss"] == 4.0
    assert s["first_val_loss"] == 6.2 and s["final_val_loss"] == 4.0 and s["best_val_step"] == 40
    assert s["median_tok_per_s"] == 25000.0 and s["median_mfu"] == 0.25 and s["peak_mem_gb"] == 0.65
    assert s["segments"] == 2 and s["train_seconds"] == 75.0 and s["stop_reason"] == "max_steps"
    assert s["nonfinite_steps"] == 1 and s["params"] > 0
    png = Path(s["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = Path(s["markdown"]).read_text()
    assert "![loss and learning rate](report.png)" in md
    assert "| val loss | 6.2000 → 4.0000 (best 4.0000 at step 40) |" in md
    assert "| steps | 40 of 40 (max steps; 2 segments) |" in md
    plain = lmforge("report", run_dir)
    assert plain.returncode == 0 and plain.stdout.startswith("report: 40 steps, loss 4.0000, val loss 4.0000")


def test_report_errors_are_one_line(tmp_path):
    p = lmforge("report", tmp_path / "missing")
    assert p.returncode == 2 and p.stderr.startswith("error: run dir") and "Traceback" not in p.stderr
    (tmp_path / "empty").mkdir()
    p = lmforge("report", tmp_path / "empty")
    assert p.returncode == 2 and "has no metrics.jsonl" in p.stderr
