"""`lmforge tokenizer train|eval` from the command line, on real English and Chinese text."""

import json
import subprocess
import sys

import pytest

from lmforge.cli import main

TANG = "chinese_poetry/quantangshi/poet.tang.0.json"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_train_then_eval_mixed_vs_english(real_data, tmp_path):
    en = [str(real_data / "tinyshakespeare" / "input.txt")]
    zh = [str(real_data / "chinese_poetry" / "songci" / "ci.song.0.json"), str(real_data / TANG)]
    r = run_cli("tokenizer", "train", "--input", *en, *zh, "--text-field", "paragraphs", "--vocab-size", "3000",
                "--out", str(tmp_path / "mixed"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["vocab_size"] == 3000 and info["eos_id"] == 2 and info["files"] == 3
    assert (tmp_path / "mixed" / "tokenizer.json").is_file()
    assert main(["tokenizer", "train", "--input", *en, "--vocab-size", "3000", "--out", str(tmp_path / "en")]) == 0

    def ev(tok, path):
        r = run_cli("tokenizer", "eval", "--tokenizer", str(tmp_path / tok), "--input", path,
                    "--text-field", "paragraphs", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["total"]

    zh_file = str(real_data / "chinese_poetry" / "classics" / "tangshi_300.json")  # held out of training
    mixed_zh, en_zh = ev("mixed", zh_file), ev("en", zh_file)
    assert mixed_zh["round_trip_exact"] == en_zh["round_trip_exact"] == 1.0
    assert mixed_zh["chars_per_token"] > 0.7 and en_zh["chars_per_token"] < 0.4
    assert mixed_zh["tokens"] * 2 < en_zh["tokens"]
    mixed_en, en_en = ev("mixed", en[0]), ev("en", en[0])
    assert en_en["bytes_per_token"] > mixed_en["bytes_per_token"] > 2.5


def test_tokenizer_cli_errors(tmp_path, capsys):
    assert main(["tokenizer", "train", "--input", str(tmp_path / "none.txt"), "--vocab-size", "500",
                 "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: input") and "does not exist" in err and "\n" not in err
    assert main(["tokenizer", "eval", "--tokenizer", str(tmp_path), "--input", str(tmp_path)]) == 2
    assert "holds no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tokenizer"])  # a subcommand is required
