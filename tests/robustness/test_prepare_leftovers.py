"""`prepare` leaves nothing behind when stopped, and says when its input is not text (issue 11, item 11)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, [f"plain words number {i} for a small tokenizer." for i in range(200)], vocab_size=300)
    return d / "out"


def test_binary_garbage_is_warned_about_with_the_count(tmp_path, tok, capsys):
    from lmforge.data.prepare import prepare

    rnd = random.Random(0)
    text = "".join(f"a readable line of text number {i}\n" for i in range(100)).encode()
    (tmp_path / "mixed.txt").write_bytes(text + rnd.randbytes(30_000))
    report = prepare([str(tmp_path / "mixed.txt")], tok, tmp_path / "out", progress=False)
    err = capsys.readouterr().err
    assert report["replaced_chars"] > 1000
    assert f"{report['replaced_chars']:,} characters" in report["encoding_warning"]
    assert "warning: " + report["encoding_warning"] in err and "U+FFFD" in err
    (tmp_path / "clean.txt").write_bytes(text)
    clean = prepare([str(tmp_path / "clean.txt")], tok, tmp_path / "out2", progress=False)
    assert clean["replaced_chars"] == 0 and "encoding_warning" not in clean


def test_sigterm_during_prepare_leaves_no_temp_files(tmp_path, tok):
    lines = [f"line {i} of a corpus long enough to be stopped halfway through, with words {i * 7 % 1000}\n"
             for i in range(300_000)]
    (tmp_path / "big.txt").write_text("".join(lines))
    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen([sys.executable, "-m", "lmforge", "prepare", "--input", str(tmp_path / "big.txt"),
                          "--tokenizer", str(tok), "--out", str(out), "--txt-mode", "line", "--min-chars", "1",
                          "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        temps = [x for x in tmp_path.iterdir() if x.name.startswith(".shards.tmp")]
        if temps and any(temps[0].iterdir()):  # shard files are being written
            break
        time.sleep(0.05)
    assert p.poll() is None, "prepare finished before it could be stopped; make the input bigger"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "terminated" in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["big.txt"]  # no temp dir, no partial output


# SIGTERM in the middle of any other writing command: `lmforge.cli.main` turns it into an exception, so the
# atomic write's temp dir is removed. The signal is sent from inside the write (deterministic timing).
_KILL_DURING_WRITE = """
import os, signal, sys
import lmforge.artifacts.model_dir as md
real = md.save_weights
def save_then_die(*args, **kwargs):
    names = real(*args, **kwargs)          # the temp dir now holds weights
    os.kill(os.getpid(), signal.SIGTERM)   # as `kill` or a scheduler would
    return names
md.save_weights = save_then_die
from lmforge import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_export_leaves_no_temp_dir_and_exits_143(tmp_path, tok):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.presets import get_preset
    from lmforge.models.transformer import build_model

    cfg = get_preset("tiny", vocab_size=320, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_hidden=64)
    save_model_dir(build_model(cfg, seed=0), tmp_path / "model", tokenizer_dir=str(tok))
    before = sorted(p.name for p in tmp_path.iterdir())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, "export", "--model", str(tmp_path / "model"),
                        "--format", "hf", "--out", str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300, env=env, check=False)
    assert p.returncode == 143, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error: terminated")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no hf/, no .hf.tmp* left beside it
