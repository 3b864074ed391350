"""One writer per output (issue 22), with real processes: a second `pretrain` on a run dir, a second `prepare`
to one --out and `export` of a run's model while that run writes are refused in one line naming the
holder; a lock left by a killed process is taken over with a note; the no-overwrite guard holds at the
final rename (renameat2 RENAME_NOREPLACE, or check-then-rename where the kernel has none).

Overlap is made certain, not hoped for: the first process runs through a small driver that stops it,
lock held, at a gate file until the test opens it (``GATED``). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.atomic import rename_noreplace, swap_into_place
from lmforge.config import UserError
from lmforge.lock import LOCK_NAME, output_lock_path, run_dir_lock_path
from tests.robustness.test_cli_corpus import LINES, _pretrain_cfg, cli

REPO = Path(__file__).resolve().parents[2]
OTHER_LINES = [f"a second corpus, line {i}: the lazy dog sleeps while the fox jumps again." for i in range(120)]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# Runs `lmforge ARGV` with GATE_TARGET (module.function) stopped until the file GATE exists; the function
# runs after the command took its lock. It writes GATE.waiting when it stops.
GATED = """
import importlib, os, sys, time
from pathlib import Path
mod_name, attr = os.environ["GATE_TARGET"].rsplit(".", 1)
mod = importlib.import_module(mod_name)
real = getattr(mod, attr)
gate = Path(os.environ["GATE"])
def gated(*a, **k):
    Path(str(gate) + ".waiting").write_text(str(os.getpid()))
    t = time.monotonic()
    while not gate.exists():
        if time.monotonic() - t > 90:
            sys.exit("gate never opened")
        time.sleep(0.02)
    return real(*a, **k)
setattr(mod, attr, gated)
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def lmforge(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)


def gated(gate: Path, target: str, *args) -> subprocess.Popen:
    """Start ``lmforge ARGS`` held at ``target`` until ``gate`` exists; return once it is held there."""
    p = subprocess.Popen([sys.executable, "-c", GATED, *map(str, args)], cwd=REPO, text=True,
                         env={**ENV, "GATE": str(gate), "GATE_TARGET": target},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiting = Path(str(gate) + ".waiting")
    deadline = time.monotonic() + 90
    while not waiting.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            _, err = p.communicate()
            pytest.fail(f"the gated command never reached {target}: rc {p.returncode}\n{err[-3000:]}")
        time.sleep(0.05)
    return p


def finish(p: subprocess.Popen, gate: Path) -> tuple[int, str, str]:
    gate.touch()
    try:
        out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return p.returncode, out, err


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_tokenizer):
    from lmforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("concurrency")
    make_tokenizer(root, LINES, vocab_size=300, name="tok")
    (root / "other.txt").write_text("\n".join(OTHER_LINES), encoding="utf-8")
    prepare([str(root / "corpus.txt")], root / "tok", root / "shards", txt_mode="line", min_chars=1, progress=False)
    cfg = root / "pretrain.yaml"
    cfg.write_text(yaml.safe_dump(_pretrain_cfg(root)))  # run.dir: root/run, 2 steps
    return root


def prepare_args(root: Path, corpus: str, out: Path) -> list:
    return ["prepare", "--input", root / corpus, "--tokenizer", root / "tok", "--out", out, "--txt-mode", "line",
            "--min-chars", "1", "--no-progress", "--json"]


def check_complete_shards(out: Path, corpus: Path) -> None:
    """``out`` is one whole prepare of ``corpus``: its index names that input and its shards hold the tokens."""
    index = json.loads((out / "index.json").read_text())
    assert index["config"]["inputs"] == [str(corpus)]
    size = {"uint16": 2, "uint32": 4}[index["dtype"]]
    for split in index["splits"].values():
        assert sum((out / s["file"]).stat().st_size for s in split["shards"]) == split["tokens"] * size
    assert index["splits"]["train"]["tokens"] > 0 and index["cleaning"]["documents_kept"] > 0


# ---- pretrain ---------------------------------------------------------------------------------------

def test_a_second_pretrain_on_a_run_dir_is_refused_and_the_first_finishes(world, tmp_path):
    run = tmp_path / "run"
    first = gated(tmp_path / "gate", "lmforge.tasks.run.run", "pretrain", "--config", world / "pretrain.yaml",
                  f"run.dir={run}", "--json")
    lock = json.loads((run / LOCK_NAME).read_text())
    assert lock["pid"] == first.pid and lock["command"] == "lmforge pretrain" and lock["host"] and lock["started"]
    before = listing(run)
    second = lmforge("pretrain", "--config", world / "pretrain.yaml", f"run.dir={run}")
    assert second.returncode == 2, second.stderr[-3000:]
    line = one_error_line(second.stderr)
    assert f"run.dir='{run}' is being written by pid {first.pid} on " in line
    assert "(lmforge pretrain, since " in line and "choose another run.dir" in line
    assert listing(run) == before  # the refused run wrote nothing

    rc, out, err = finish(first, tmp_path / "gate")
    assert rc == 0, err[-3000:]
    assert json.loads(out)["step"] == 2
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]  # one run's log, not two interleaved
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (run / "model").iterdir()}
    assert not (run / LOCK_NAME).exists()  # released with the run


def test_export_of_a_model_whose_run_is_writing_is_refused(world, tmp_path):
    rc, _, err, raised = cli(["pretrain", "--config", world / "pretrain.yaml", f"run.dir={tmp_path / 'run'}"])
    assert rc == 0 and not raised, err[-3000:]
    run, hf = tmp_path / "run", tmp_path / "hf"
    # the same run again (resume=auto): it holds the run dir, and replaces run/model when it ends
    resumed = gated(tmp_path / "gate", "lmforge.tasks.run.run", "pretrain", "--config", world / "pretrain.yaml",
                    f"run.dir={run}")
    export = lmforge("export", "--model", run / "model", "--out", hf)
    assert export.returncode == 2, export.stderr[-3000:]
    line = one_error_line(export.stderr)
    assert f"--model '{run / 'model'}' lies in the run dir '{run}', which is being written by pid {resumed.pid}" in line
    assert "lmforge pretrain" in line
    assert not hf.exists() and not output_lock_path(hf).exists()

    rc, _, err = finish(resumed, tmp_path / "gate")
    assert rc == 0, err[-3000:]
    rc, _, err, raised = cli(["export", "--model", run / "model", "--out", hf])  # safe once the run is done
    assert rc == 0 and not raised, err[-3000:]
    assert (hf / "config.json").is_file() and not output_lock_path(hf).exists()


# ---- prepare ----------------------------------------------------------------------------------------

def test_two_prepares_to_one_out_at_once_one_wins_whole(world, tmp_path):
    out = tmp_path / "shards"
    procs = {name: subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, prepare_args(world, name, out))],
                                    cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("corpus.txt", "other.txt")}
    results = {}
    for name, p in procs.items():
        out_text, err_text = p.communicate(timeout=120)
        results[name] = (p.returncode, out_text, err_text)
    winners = [name for name, (rc, _, _) in results.items() if rc == 0]
    assert len(winners) == 1, {n: (rc, err[-1000:]) for n, (rc, _, err) in results.items()}
    (loser,) = set(results) - set(winners)
    rc, _, err = results[loser]
    assert rc == 2
    line = one_error_line(err)
    # refused by the lock while the winner writes, or by the no-overwrite guard once it has finished
    assert (f"is being written by pid {procs[winners[0]].pid}" in line or "already exists" in line), line
    check_complete_shards(out, world / winners[0])
    assert json.loads(results[winners[0]][1])["tokens"] == json.loads((out / "index.json").read_text())["cleaning"]["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp dir, no lock file left


def test_a_prepare_while_another_writes_is_refused_naming_it(world, tmp_path):
    out = tmp_path / "shards"
    first = gated(tmp_path / "gate", "lmforge.data.prepare.make_engine", *prepare_args(world, "corpus.txt", out))
    second = lmforge(*prepare_args(world, "other.txt", out))
    assert second.returncode == 2, second.stderr[-3000:]
    line = one_error_line(second.stderr)
    assert f"--out '{out}' is being written by pid {first.pid} on " in line and "(lmforge prepare, since " in line
    rc, _, err = finish(first, tmp_path / "gate")
    assert rc == 0, err[-3000:]
    check_complete_shards(out, world / "corpus.txt")
    assert not output_lock_path(out).exists()


# ---- stale locks ------------------------------------------------------------------------------------

HOLD = """
import sys, time
from lmforge.lock import acquire
acquire(sys.argv[1], sys.argv[2], "test", "wait")
print("held", flush=True)
time.sleep(120)
"""


def killed_holder(lock_file: Path, command: str) -> int:
    """A process that took ``lock_file`` and was killed (SIGKILL: no cleanup ran); returns its pid."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file), command], cwd=REPO, env=ENV, text=True,
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "held"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert json.loads(lock_file.read_text())["pid"] == p.pid
    return p.pid


def test_a_stale_output_lock_is_taken_over_with_a_note(world, tmp_path):
    out = tmp_path / "shards"
    pid = killed_holder(output_lock_path(out), "lmforge prepare")
    p = lmforge(*prepare_args(world, "corpus.txt", out))
    assert p.returncode == 0, p.stderr[-3000:]
    notes = [x for x in p.stderr.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and "taking over the stale lock" in notes[0], p.stderr
    assert f"left by pid {pid} on " in notes[0] and "which is no longer running" in notes[0]
    check_complete_shards(out, world / "corpus.txt")
    assert not output_lock_path(out).exists()


def test_a_stale_run_dir_lock_is_taken_over_with_a_note(world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pid = killed_holder(run_dir_lock_path(run), "lmforge pretrain")  # e.g. a run killed by the OOM killer
    rc, _, err, raised = cli(["pretrain", "--config", world / "pretrain.yaml", f"run.dir={run}"])
    assert rc == 0 and not raised, err[-3000:]
    notes = [x for x in err.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and f"taking over the stale lock '{run / LOCK_NAME}' left by pid {pid}" in notes[0]
    assert (run / "model" / "config.json").is_file() and not (run / LOCK_NAME).exists()


ORPHAN = """
import os, sys, time
from lmforge.lock import acquire
acquire(sys.argv[1], "lmforge prepare", "test", "wait")
child = os.fork()
if child == 0:  # a worker that outlives its parent keeps the inherited lock
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os._exit(0)
"""


def test_a_lock_kept_by_an_orphaned_child_names_the_exited_parent(world, tmp_path):
    out = tmp_path / "shards"
    parent = subprocess.run([sys.executable, "-c", ORPHAN, str(output_lock_path(out))], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=60, check=True)
    child = int(parent.stdout)
    try:
        p = lmforge(*prepare_args(world, "corpus.txt", out))
        assert p.returncode == 2, p.stderr[-3000:]
        line = one_error_line(p.stderr)
        assert "is still locked by a process that pid " in line and "has exited; find it with `fuser " in line
        assert not out.exists()
    finally:
        os.kill(child, signal.SIGKILL)


# ---- the no-overwrite guard at the rename --------------------------------------------------------------

@pytest.fixture(params=["renameat2", "fallback"])
def rename_impl(request, monkeypatch):
    from lmforge import atomic

    if request.param == "fallback":  # a kernel or filesystem without RENAME_NOREPLACE
        monkeypatch.setattr(atomic, "_renameat2", False)
    else:
        assert atomic._libc_renameat2() is not None, "glibc >= 2.28 has renameat2"
    return request.param


def test_rename_noreplace_never_replaces(tmp_path, rename_impl):
    (tmp_path / "a").write_text("a")
    rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "a" and not (tmp_path / "a").exists()
    (tmp_path / "c").write_text("c")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "c", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "a" and (tmp_path / "c").read_text() == "c"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("new")
    for dst in ("full", "empty", "b"):  # a non-empty dir, an empty dir, a file
        if dst != "b":
            (tmp_path / dst).mkdir()
        if dst == "full":
            (tmp_path / dst / "f").write_text("old")
        with pytest.raises(FileExistsError):
            rename_noreplace(tmp_path / "src", tmp_path / dst)
    assert (tmp_path / "full" / "f").read_text() == "old" and (tmp_path / "src" / "f").read_text() == "new"
    with pytest.raises(FileNotFoundError):
        rename_noreplace(tmp_path / "missing", tmp_path / "new")


def test_swap_into_place_rechecks_the_guard(tmp_path, rename_impl):
    def built(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "index.json").write_text(name)
        return d

    out = tmp_path / "out"
    out.mkdir()
    (out / "user.txt").write_text("mine")  # appeared after the start-up check
    tmp = built(".out.tmp1")
    with pytest.raises(UserError, match=r"^--out '.*out' appeared while this command was writing it .* --overwrite"):
        swap_into_place(tmp, out, overwrite=False)
    assert listing(out) == {"user.txt": 4} and (tmp / "index.json").is_file()  # both left as they were
    swap_into_place(tmp, out, overwrite=True)
    assert listing(out) == {"index.json": 9}
    empty = tmp_path / "empty"
    empty.mkdir()
    swap_into_place(built(".empty.tmp1"), empty, overwrite=False)  # an empty dir is no one's output
    assert (empty / "index.json").read_text() == ".empty.tmp1"
    swap_into_place(built(".new.tmp1"), tmp_path / "new", overwrite=False)
    assert (tmp_path / "new" / "index.json").is_file()


def test_prepare_does_not_replace_an_out_that_appears_while_it_runs(world, tmp_path, monkeypatch):
    import lmforge.data.prepare as prep

    out = tmp_path / "shards"
    real = prep.make_engine

    def meanwhile(*a, **k):  # another program (not lmforge: no lock) fills --out mid-run
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return real(*a, **k)

    monkeypatch.setattr(prep, "make_engine", meanwhile)
    with pytest.raises(UserError, match="appeared while this command was writing it"):
        prep.prepare([str(world / "corpus.txt")], world / "tok", out, txt_mode="line", min_chars=1, progress=False)
    assert listing(out) == {"theirs.txt": 6}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temp dir, no lock file left


SECOND_WRITER = """
import sys
from lmforge.outputs import exclusive_output
try:
    with exclusive_output(sys.argv[1], "lmforge export"):
        pass
except Exception as e:
    print(e)
    sys.exit(2)
"""


def test_export_output_is_exclusive_and_never_replaced_at_the_rename(tmp_path):
    from lmforge.atomic import atomic_directory
    from lmforge.outputs import exclusive_output

    out = tmp_path / "hf"
    with exclusive_output(out, "lmforge export"):
        assert json.loads(output_lock_path(out).read_text())["command"] == "lmforge export"
        second = subprocess.run([sys.executable, "-c", SECOND_WRITER, str(out)], cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 2 and f"--out '{out}' is being written by pid {os.getpid()} on " in second.stdout
        out.mkdir()  # something else fills --out while the export builds it
        (out / "theirs.txt").write_text("theirs")
        with pytest.raises(UserError, match="appeared while this command was writing it"), atomic_directory(out) as t:
            (t / "config.json").write_text("{}")
    assert listing(out) == {"theirs.txt": 6}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dir, no lock file left
    with exclusive_output(out, "lmforge export", overwrite=True), atomic_directory(out) as t:
        (t / "config.json").write_text("{}")
    assert listing(out) == {"config.json": 2}


# ---- import and tokenizer train (issue 22) ----------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(world):
    """A small Hugging Face Llama dir (exported from an lmforge model dir with the world's tokenizer)."""
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64, vocab_size=300,
                                    max_seq_len=64), seed=0)
    save_model_dir(model, world / "m", tokenizer_dir=str(world / "tok"))
    rc, _, err, raised = cli(["export", "--model", world / "m", "--out", world / "hf"])
    assert rc == 0 and not raised, err[-3000:]
    return world / "hf"


def test_an_import_while_another_writes_its_out_is_refused_naming_it(hf_dir, tmp_path):
    out = tmp_path / "imported"
    first = gated(tmp_path / "gate", "lmforge.artifacts.hf.convert.import_hf", "import", "--hf", hf_dir,
                  "--out", out)
    assert json.loads(output_lock_path(out).read_text())["command"] == "lmforge import"
    second = lmforge("import", "--hf", hf_dir, "--out", out)
    assert second.returncode == 2, second.stderr[-3000:]
    line = one_error_line(second.stderr)
    assert f"--out '{out}' is being written by pid {first.pid} on " in line and "(lmforge import, since " in line
    assert "choose another --out" in line
    rc, _, err = finish(first, tmp_path / "gate")
    assert rc == 0, err[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(listing(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "gate.waiting", "imported"]  # no lock, no temp


def test_a_tokenizer_train_while_another_writes_its_out_is_refused_naming_it(world, tmp_path):
    out = tmp_path / "tok"
    base = ["tokenizer", "train", "--vocab-size", "300", "--txt-mode", "line", "--input", world / "corpus.txt"]
    first = gated(tmp_path / "gate", "lmforge.tokenizer.train.train_tokenizer", *base, "--out", out)
    second = lmforge(*base, world / "other.txt", "--out", out)
    assert second.returncode == 2, second.stderr[-3000:]
    line = one_error_line(second.stderr)
    assert f"--out '{out}' is being written by pid {first.pid} on " in line
    assert "(lmforge tokenizer train, since " in line
    rc, _, err = finish(first, tmp_path / "gate")
    assert rc == 0, err[-3000:]
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(listing(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate", "gate.waiting", "tok"]  # no lock, no temp
    # the refused writer's corpus left no trace: the tokenizer is the first one's, trained on corpus.txt
    again = lmforge(*base, "--out", tmp_path / "tok2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok2" / "tokenizer.json").read_bytes()
