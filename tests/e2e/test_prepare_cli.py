"""`lmforge prepare` from the command line on real English and Chinese text (vendored slices, tests/data)."""

import json
import subprocess
import sys

from lmforge.cli import main
from lmforge.data.loader import ShardLoader
from lmforge.data.shards import verify_shards
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_prepare_english_and_chinese(real_data, tmp_path):
    en = real_data / "english_corpus" / "nltk_inaugural"
    zh = real_data / "chinese_poetry" / "classics"
    tok_dir = tmp_path / "tok"
    train_tokenizer([str(en), str(zh / "lunyu.json"), str(zh / "tangshi_300.json")], 2000, tok_dir,
                    text_field="paragraphs,content", progress=False)
    out = tmp_path / "shards"
    r = run_cli("prepare", "--input", str(en), str(zh / "*.json"), "--text-field", "paragraphs,content",
                "--tokenizer", str(tok_dir), "--out", str(out), "--val-fraction", "0.05", "--workers", "2",
                "--dedup", "near", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    speeches, anthologies = sorted(en.glob("*.txt")), sorted(zh.glob("*.json"))
    records = sum(len(json.loads(f.read_text(encoding="utf-8"))) for f in anthologies)
    assert rep["files"] == len(speeches) + len(anthologies) == 14 and rep["skipped_files"] == 0
    assert rep["documents_read"] == len(speeches) + records  # a speech per file, a record per poem / chapter
    assert rep["removed_exact_duplicates"] >= 1  # tangshi_300 repeats an entry
    assert rep["documents_kept"] == rep["documents_read"] - rep["removed_exact_duplicates"] - \
        rep["removed_near_duplicates"] - rep["removed_short"] - rep["removed_empty"]
    assert rep["val_documents"] >= 3 and rep["train_documents"] + rep["val_documents"] == rep["documents_kept"]
    assert "prepare:" in r.stderr and "MB/s" in r.stderr
    index = verify_shards(out)
    tok = load_tokenizer(tok_dir)
    assert index["cleaning"]["tokens"] == rep["tokens"] and index["tokenizer"]["path"] == str(tok_dir.resolve())
    loader = ShardLoader(out, seq_len=64, global_batch=4, check_vocab=tok.vocab_size, tokenizer_hash=tok.hash)
    text = "".join(tok.decode(row) for row in loader.next_batch().tolist())
    assert text.strip()
    # one summary line without --json
    r2 = run_cli("prepare", "--input", str(zh / "lunyu.json"), "--text-field", "paragraphs", "--tokenizer",
                 str(tok_dir), "--out", str(tmp_path / "s2"), "--no-progress")
    assert r2.returncode == 0 and len(r2.stdout.strip().splitlines()) == 1 and "tokens" in r2.stdout


def test_prepare_cli_errors(real_data, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    train_tokenizer([str(real_data / "tinyshakespeare" / "input.txt")], 400, tok_dir, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a document long enough"}\n{"content": "x"}\n')
    assert main(["prepare", "--input", str(bad), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:2 has no field 'text' (fields: content); pass --text-field NAME"
    assert not (tmp_path / "o").exists()
    assert main(["prepare", "--input", "memory://missing-bucket/x.txt", "--tokenizer", str(tok_dir),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
