"""`lmforge pretrain` on a three-source data mixture (data.sources) with an annealing phase (data.schedule):
per-source loss and bits/byte in metrics.jsonl and the report, the weighted total, the clean end when every
source stopped, and `lmforge plan`'s tokens per source."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # each test runs the CLI (~20-40 s on a shared 2-core CPU)

REPO = Path(__file__).resolve().parents[2]
TEXTS = {"plays": REPO / "tests/data/tinyshakespeare/input.txt",
         "speeches": REPO / "tests/data/english_corpus/nltk_inaugural",
         "wiki": REPO / "tests/data/web/wiki_en.jsonl"}
WEIGHTS = {"plays": 0.6, "speeches": 0.3, "wiki": 0.1}


def lmforge(*args, check=True):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer.train import train_tokenizer

    d = tmp_path_factory.mktemp("mix")
    files = [str(TEXTS["plays"]), *sorted(str(p) for p in TEXTS["speeches"].glob("*.txt")), str(TEXTS["wiki"])]
    train_tokenizer(files, 512, d / "tok", txt_mode="blank", progress=False)
    for name, src in TEXTS.items():
        prepare([str(src)], d / "tok", d / name, val_fraction=0.05, txt_mode="blank", progress=False)
    return d


def config(sources, run_dir, steps=12, stop=(), **data):
    cfg = yaml.safe_load((REPO / "lmforge/recipes/pretrain/tiny.yaml").read_text())
    cfg["run"]["dir"] = str(run_dir)
    cfg["data"] = {"seq_len": 64, "sources": [
        {"name": n, "dir": str(sources / n), "weight": w, "on_exhaust": "stop" if n in stop else "repeat"}
        for n, w in WEIGHTS.items()], **data}
    cfg["train"].update(global_batch=16, micro_batch=8, max_steps=steps, threads=1)
    cfg["schedule"].update(warmup_steps=2)
    cfg["eval"] = {"interval": 4, "batches": 2}
    cfg["checkpoint"] = {"interval": 4, "keep_last": 3}
    cfg["log"] = {"interval": 2, "peak_tflops": 1.0}
    path = Path(run_dir).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def evals(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


def test_three_sources_with_an_annealing_phase(sources, tmp_path):
    run_dir = tmp_path / "run"
    anneal = [{"until_step": 8, "weights": WEIGHTS},
              {"until_step": 12, "weights": {"plays": 0.2, "speeches": 0.2, "wiki": 0.6}, "interpolate": "linear"}]
    p = lmforge("pretrain", "--config", config(sources, run_dir, schedule=anneal), "--json")
    result = json.loads(p.stdout)
    assert result["step"] == 12 and result["stop_reason"] == "max_steps"
    rows = evals(run_dir)
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    for r in rows:
        for n in WEIGHTS:
            assert math.isfinite(r[f"val_loss/{n}"]) and math.isfinite(r[f"val_bpb/{n}"])
        # the total is the sources' values weighted by data.sources' weights
        assert r["val_loss"] == pytest.approx(sum(WEIGHTS[n] * r[f"val_loss/{n}"] for n in WEIGHTS))
        assert r["val_bpb"] == pytest.approx(sum(WEIGHTS[n] * r[f"val_bpb/{n}"] for n in WEIGHTS))
    assert all(rows[-1][f"val_loss/{n}"] < rows[0][f"val_loss/{n}"] for n in WEIGHTS)  # every source learnt
    assert "val_loss/wiki" in p.stderr  # the eval line names the sources
    # the checkpointed loader state: one cursor per source, the anneal moved samples to wiki
    state = json.loads((run_dir / "checkpoints" / "step_000012" / "rank_00000.json").read_text())["loader"]
    assert state["kind"] == "mixture" and state["samples_seen"] == 12 * 16 and state["batches_seen"] == 12
    cursors = {n: s["cursor"] for n, s in state["sources"].items()}
    assert sum(cursors.values()) == 12 * 16 and cursors["wiki"] > 0.1 * 12 * 16
    lmforge("report", run_dir)
    report = (run_dir / "report.md").read_text()
    assert "val bits per byte" in report and "wiki" in report
    assert (run_dir / "report.png").stat().st_size > 0


def test_every_source_stopped_ends_the_run_cleanly(sources, tmp_path):
    from lmforge.data.shards import read_index

    run_dir = tmp_path / "stop"
    windows = sum((read_index(sources / n)["splits"]["train"]["tokens"] - 1) // 64 for n in WEIGHTS)
    p = lmforge("pretrain", "--config", config(sources, run_dir, steps=10_000, stop=tuple(WEIGHTS)), "--json")
    result = json.loads(p.stdout)
    assert result["stop_reason"] == "data_exhausted" and result["step"] == windows // 16
    assert result["exit_code"] == 0 and (run_dir / "model" / "config.json").is_file()
    assert "every source with a positive weight is exhausted" in p.stderr
    state = json.loads((run_dir / "checkpoints" / f"step_{result['step']:06d}" / "rank_00000.json").read_text())
    for n, s in state["loader"]["sources"].items():
        assert s["cursor"] <= s["num_windows"], n  # a stop source never repeats a window
    # running it again resumes and ends at once, the same way
    again = json.loads(lmforge("pretrain", "--config", run_dir.with_suffix(".yaml"), "--json").stdout)
    assert again["stop_reason"] == "data_exhausted" and again["step"] == result["step"]


def test_plan_prints_tokens_per_source(sources, tmp_path):
    anneal = [{"until_step": 80, "weights": WEIGHTS}, {"until_step": 100, "weights": {"wiki": 1.0}}]
    path = config(sources, tmp_path / "plan", steps=100, schedule=anneal)
    p = lmforge("plan", "--model", path, "--json")
    mix = json.loads(p.stdout)["data_sources"]
    total = 100 * 16 * 64
    assert sum(s["tokens"] for s in mix["sources"].values()) == pytest.approx(total)
    assert mix["sources"]["wiki"]["tokens"] == pytest.approx((80 * 0.1 + 20) * 16 * 64)
    assert mix["sources"]["wiki"]["epochs"] > 1  # the small source repeats
    text = lmforge("plan", "--model", path).stdout
    assert "wiki" in text and "epochs" in text


def test_mismatched_tokenizer_is_one_line(sources, tmp_path, make_tokenizer):
    from lmforge.data.prepare import prepare

    make_tokenizer(tmp_path, ["some other text for another tokenizer"] * 50, vocab_size=300)
    other = tmp_path / "out"
    prepare([str(TEXTS["wiki"])], other, tmp_path / "wiki2", val_fraction=0.05, progress=False)
    cfg = yaml.safe_load(config(sources, tmp_path / "bad").read_text())
    cfg["data"]["sources"][2]["dir"] = str(tmp_path / "wiki2")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = lmforge("pretrain", "--config", path, check=False)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "tokenizer" in err[0] and str(tmp_path / "wiki2") in err[0], err
