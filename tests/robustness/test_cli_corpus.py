"""Every CLI command against a generated corpus of bad inputs (issue 11).

Each case builds its bad input under ``WORLD/cases/NAME``, snapshots the whole world (sha256 of every
file, every directory), runs the CLI in-process (``lmforge.cli.main``) and asserts: a non-zero exit,
exactly one stderr line starting with ``error:`` (the last one, naming the expected problem), no
traceback, and a world identical to the snapshot — no input changed, nothing lost, no partial output —
within a stated wall time and peak memory (`Case.max_s`, `Case.max_mb`: 60 s and 1.5 GiB unless a case
says otherwise). In-process, the peak is the test process's peak RSS above its RSS when the case started
(the kernel's high-water mark, reset per case through ``/proc/self/clear_refs``; sampled every 5 ms where
that cannot be written); through a real process it is that process's own peak RSS (``wait4``). A few cases
go through a real ``python -m lmforge`` process to prove the exit path. The counts (cases, tracebacks,
files lost, over-memory, over-time) are printed at the end of the run (tests/robustness/conftest.py) and
quoted in the README.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LINES = [f"the quick brown fox {i} jumps over the lazy dog number {i % 7}, again and again." for i in range(200)]
OTHER = [f"completely different vocabulary item {i} with other words entirely." for i in range(200)]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))
HF_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


class CreatesFile:
    """Unpickling this creates ``path``: the stand-in for an attacker's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class World:
    root: Path
    tok: Path
    other_tok: Path
    shards: Path
    run: Path
    model: Path
    corpus: Path
    sft: Path
    pre_cfg: Path
    ft_cfg: Path
    hf: Path


def _pretrain_cfg(root: Path) -> dict:
    cfg = yaml.safe_load((REPO / "lmforge/recipes/pretrain/tiny.yaml").read_text())
    cfg["run"]["dir"] = str(root / "run")
    cfg["data"].update(dir=str(root / "shards"), seq_len=16)
    cfg["model"].update(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64)
    cfg["train"].update(global_batch=4, micro_batch=4, max_steps=2, threads=1)
    cfg["eval"].update(batches=0)
    cfg["checkpoint"].update(interval=1, keep_last=3)
    cfg["log"].update(interval=1)
    cfg["schedule"].update(warmup_steps=1)
    return cfg


def cli(argv: list[str]) -> tuple[int | None, str, str, bool]:
    """(exit code, stdout, stderr, raised) of ``lmforge ARGV`` run in this process."""
    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    raised = False
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaping exception is the bug being counted
            raised, rc = True, None
            traceback.print_exc(file=err)
    return rc, out.getvalue(), err.getvalue(), raised


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_tokenizer) -> World:
    from lmforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("world")
    make_tokenizer(root, LINES, vocab_size=300, name="tok")
    (root / "other").mkdir()
    make_tokenizer(root / "other", OTHER, vocab_size=280, name="tok")
    prepare([str(root / "corpus.txt")], root / "tok", root / "shards", txt_mode="line", min_chars=1, progress=False)
    pre_cfg = root / "pretrain.yaml"
    pre_cfg.write_text(yaml.safe_dump(_pretrain_cfg(root)))
    rc, _, err, raised = cli(["pretrain", "--config", pre_cfg])
    assert rc == 0 and not raised, err[-3000:]
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"number {i}"}) + "\n" for i in range(20)))
    ft_cfg = root / "finetune.yaml"
    ft_cfg.write_text(yaml.safe_dump({
        "run": {"dir": str(root / "ft")}, "model": {"from": str(root / "run" / "model")},
        "finetune": {"mode": "sft"}, "data": {"train": [str(sft)], "format": "alpaca", "seq_len": 32},
        "train": {"global_batch": 4, "micro_batch": 4, "max_steps": 1}}))
    rc, _, err, raised = cli(["export", "--model", root / "run" / "model", "--out", root / "hf"])
    assert rc == 0 and not raised, err[-3000:]
    return World(root, root / "tok", root / "other" / "tok", root / "shards", root / "run", root / "run" / "model",
                 root / "corpus.txt", sft, pre_cfg, ft_cfg, root / "hf")


def snapshot(root: Path) -> dict[str, str]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        state[rel + "/"] = "dir"
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():  # a case's link (a loop, even) is checked as a link, not followed
                state[os.path.join(rel, name)] = "link:" + os.readlink(p)
                continue
            state[os.path.join(rel, name)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return state


# ---- helpers that build bad inputs ------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _junk(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _model_copy(w: World, d: Path, mutate: Callable[[Path], None]) -> Path:
    m = _copy(w.model, d / "model")
    mutate(m)
    return m


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _swap_tok(w: World) -> Callable[[Path], None]:
    return lambda m: shutil.copy(w.other_tok / "tokenizer.json", m / "tokenizer.json")


def _write(p: Path, content: str | bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def _user_folder(d: Path) -> Path:
    return _write(d / "thesis" / "thesis.tex", r"\chapter{Years of work}").parent


def _shards_with_index(w: World, d: Path, content: str | Callable[[dict], None]) -> Path:
    s = _copy(w.shards, d / "shards")
    if callable(content):
        index = json.loads((s / "index.json").read_text())
        content(index)
        content = json.dumps(index)
    (s / "index.json").write_text(content)
    return s


def _hf_dir(d: Path, config: str | bytes | None, weights: bytes | None) -> Path:
    h = d / "models" / "llama"
    h.mkdir(parents=True)
    if config is not None:
        _write(h / "config.json", config)
    if weights is not None:
        _write(h / "model.safetensors", weights)
    return h


def _checkpoint_copy(w: World, d: Path, mutate: Callable[[Path, Path], None]) -> Path:
    from lmforge.train import checkpoint as ckpt

    c = _copy(w.run / "checkpoints" / "step_000002", d / "ck" / "step_000002")
    mutate(c, d)
    ckpt.write_manifest(c)  # an attacker rewrites the manifest too: integrity is not origin
    return c


def _pickle_index(c: Path, d: Path) -> None:
    (c / ".metadata").write_bytes(pickle.dumps(CreatesFile(d / "pwned")))


def _bytes_entry(c: Path, d: Path) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    buf = io.BytesIO()
    torch.save(CreatesFile(d / "pwned"), buf)
    (c / "__0_1.distcp").write_bytes(buf.getvalue())
    md = pickle.loads((c / ".metadata").read_bytes())  # the test's own, trusted file
    fqn = "model.tok_embeddings.weight"
    md.state_dict_metadata[fqn] = BytesStorageMetadata()
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo("__0_1.distcp", 0, len(buf.getvalue()))
    (c / ".metadata").write_bytes(pickle.dumps(md))


def _deep_json(n: int = 50000) -> str:
    return "[" * n + "]" * n


# ---- the corpus ------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    build: Callable[[World, Path], list]  # -> argv
    expect: str  # a phrase the error line must hold
    max_s: float = 60.0  # wall time bound
    max_mb: float = 1536.0  # peak RSS bound (MiB; in-process: above the RSS at the case's start)


# ---- measuring a case ------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.mb``: the peak RSS of this process during the block above its
    RSS at the start, in MiB. Resets the kernel's high-water mark (VmHWM) through /proc/self/clear_refs; where
    that is not allowed, a thread samples VmRSS every 5 ms (then a spike shorter than that can be missed)."""

    def __enter__(self):
        self.start = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS
            self.sampler = None
        except OSError:
            self.peak, self.stop = self.start, threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _status_kb("VmRSS"))

    def __exit__(self, *exc):
        if self.sampler is None:
            peak = _status_kb("VmHWM")
        else:
            self.stop.set()
            self.sampler.join()
            peak = max(self.peak, _status_kb("VmRSS"))
        self.mb = max(peak - self.start, 0) / 1024
        return False


def run_process(argv: list[str], env: dict, timeout: float) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, peak RSS in MiB) of ``argv`` as a child process, its peak from ``wait4``."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                usage.ru_maxrss / 1024)


def _pre(w, *extra):
    return ["pretrain", "--config", w.pre_cfg, *extra]


def _ft(w, *extra):
    return ["finetune", "--config", w.ft_cfg, *extra]


def _gen(model, *extra):
    return ["generate", "--model", model, "--prompt", "the quick", "--max-new-tokens", "4", *extra]


CASES = [
    # pretrain: configs
    Case("pretrain-missing-config", lambda w, d: ["pretrain", "--config", d / "nope.yaml"], "does not exist"),
    Case("pretrain-yaml-alias-bomb", lambda w, d: ["pretrain", "--config", _write(d / "c.yaml", BOMB)], "alias"),
    Case("pretrain-yaml-list", lambda w, d: ["pretrain", "--config", _write(d / "c.yaml", "- a\n- b\n")],
         "mapping"),
    Case("pretrain-yaml-binary", lambda w, d: ["pretrain", "--config", _write(d / "c.yaml", _junk(4096, 1))],
         "config file"),
    Case("pretrain-yaml-syntax", lambda w, d: ["pretrain", "--config", _write(d / "c.yaml", "run: [open\n")],
         "not valid yaml"),
    Case("pretrain-yaml-deep", lambda w, d: ["pretrain", "--config", _write(d / "c.yaml", _deep_json(20000))],
         "config file"),
    Case("pretrain-override-type", lambda w, d: _pre(w, "optim.lr=abc"), "optim.lr"),
    Case("pretrain-unknown-key", lambda w, d: _pre(w, "optim.lrr=1"), "unknown config key"),
    # pretrain: run dir
    Case("pretrain-run-dir-proc", lambda w, d: _pre(w, "run.dir=/proc/lmforge"), "/proc"),
    Case("pretrain-run-dir-foreign", lambda w, d: _pre(w, f"run.dir={_user_folder(d)}"), "not an lmforge run dir"),
    Case("pretrain-run-dir-is-data", lambda w, d: _pre(w, f"run.dir={w.shards}"), "inputs"),
    Case("pretrain-run-dir-holds-data", lambda w, d: _pre(w, f"run.dir={w.root}"), "not an lmforge run dir"),
    Case("pretrain-data-at-run-output", lambda w, d: _pre(w, f"run.dir={d / 'r'}", "data.dir=" + str(
        _copy(w.shards, _write(d / "r" / ".lmforge_run.json", "{}").parent / "model"))), "holds the input"),
    Case("pretrain-run-dir-is-file", lambda w, d: _pre(w, f"run.dir={_write(d / 'f', 'x')}"), "is a file"),
    # pretrain: data identity and index
    Case("pretrain-wrong-tokenizer", lambda w, d: _pre(w, f"data.tokenizer={w.other_tok}"),
         "not the one the shards"),
    Case("pretrain-index-garbage", lambda w, d: _pre(w, f"data.dir={_shards_with_index(w, d, '{garbage')}"),
         "not valid json"),
    Case("pretrain-index-empty", lambda w, d: _pre(w, f"data.dir={_shards_with_index(w, d, '')}"), "not valid json"),
    Case("pretrain-index-deep", lambda w, d: _pre(w, f"data.dir={_shards_with_index(w, d, _deep_json())}"),
         "nested"),
    Case("pretrain-index-tokens-string", lambda w, d: _pre(w, "data.dir=" + str(_shards_with_index(
        w, d, lambda ix: ix["splits"]["train"]["shards"][0].update(tokens="many")))), "malformed"),
    Case("pretrain-index-split-string", lambda w, d: _pre(w, "data.dir=" + str(_shards_with_index(
        w, d, lambda ix: ix["splits"].update(train="all of it")))), "malformed"),
    # pretrain: hostile checkpoints
    Case("resume-pickle-in-metadata", lambda w, d: _pre(
        w, f"run.dir={d / 'new'}", f"train.resume={_checkpoint_copy(w, d, _pickle_index)}"), "refusing"),
    Case("resume-pickle-in-distcp-entry", lambda w, d: _pre(
        w, f"run.dir={d / 'new'}", f"train.resume={_checkpoint_copy(w, d, _bytes_entry)}"), "pickled object"),
    Case("resume-truncated-explicit", lambda w, d: _pre(w, f"run.dir={d / 'new'}", "train.resume=" + str(
        _truncated_ck(w, d))), "cannot be trusted"),
    # finetune
    Case("finetune-base-inside-run", lambda w, d: _ft(w, f"run.dir={w.run}"), "holds the input"),
    Case("finetune-run-dir-is-base", lambda w, d: _ft(w, f"run.dir={w.model}"), "inputs"),
    Case("finetune-swapped-tokenizer", lambda w, d: _ft(w, f"model.from={_model_copy(w, d, _swap_tok(w))}",
                                                        f"run.dir={d / 'ft'}"), "not the ones its weights"),
    Case("finetune-yaml-alias-bomb", lambda w, d: ["finetune", "--config", _write(d / "c.yaml", BOMB)], "alias"),
    Case("finetune-data-deep", lambda w, d: _ft(w, f"run.dir={d / 'ft'}", "data.train=[" + str(_write(
        d / "sft.jsonl", '{"instruction": "a", "output": ' + _deep_json(100000) + "}\n")) + "]"),
         "sft.jsonl:1: json nested deeper"),
    Case("finetune-run-dir-foreign", lambda w, d: _ft(w, f"run.dir={_user_folder(d)}"), "not an lmforge run dir"),
    # import
    Case("import-missing", lambda w, d: ["import", "--hf", d / "nope", "--out", d / "o"], "does not exist"),
    Case("import-config-garbage", lambda w, d: ["import", "--hf", _hf_dir(d, _junk(3000, 2), None),
                                                "--out", d / "o"], "not valid json"),
    Case("import-config-truncated", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA)[:40], None),
                                                  "--out", d / "o"], "not valid json"),
    Case("import-config-deep", lambda w, d: ["import", "--hf", _hf_dir(d, _deep_json(), None), "--out", d / "o"],
         "nested"),
    Case("import-config-list", lambda w, d: ["import", "--hf", _hf_dir(d, "[1, 2]", None), "--out", d / "o"],
         "not a hugging face config"),
    Case("import-random-safetensors", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA),
                                                                             _junk(5000, 3)), "--out", d / "o"],
         "not a readable safetensors"),
    Case("import-empty-safetensors", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA), b""),
                                                   "--out", d / "o"], "not a readable safetensors"),
    Case("import-out-is-source", lambda w, d: ["import", "--hf", (h := _hf_dir(d, json.dumps(HF_LLAMA), b"")),
                                               "--out", h], "inputs"),
    Case("import-out-holds-source", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA), b""),
                                                  "--out", d / "models"], "holds the input"),
    Case("import-out-foreign", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA), b""),
                                             "--out", _user_folder(d)], "--overwrite"),
    Case("import-out-proc", lambda w, d: ["import", "--hf", _hf_dir(d, json.dumps(HF_LLAMA), b""),
                                          "--out", "/proc/lmforge"], "/proc"),
    # export
    Case("export-out-is-run-dir", lambda w, d: ["export", "--model", w.model, "--out", w.run], "holds the input"),
    Case("export-out-is-model", lambda w, d: ["export", "--model", w.model, "--out", w.model], "inputs"),
    Case("export-out-inside-model", lambda w, d: ["export", "--model", w.model, "--out", w.model / "hf"],
         "inside the input dir"),
    Case("export-out-foreign", lambda w, d: ["export", "--model", w.model, "--out", _user_folder(d)],
         "--overwrite"),
    Case("export-out-proc", lambda w, d: ["export", "--model", w.model, "--out", "/proc/x"], "/proc"),
    Case("export-config-garbage", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _write(m / "config.json", _junk(2000, 4))), "--out", d / "o"], "not valid json"),
    Case("export-config-mistyped", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _retype_config(m, dim="big")), "--out", d / "o"], "model.dim"),
    Case("export-config-list", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _write(m / "config.json", "[]")), "--out", d / "o"], "model config"),
    Case("export-config-deep", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _write(m / "config.json", _deep_json())), "--out", d / "o"], "nested"),
    Case("export-truncated-safetensors", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _truncate(m / "model.safetensors")), "--out", d / "o"], "not a readable safetensors"),
    Case("export-empty-safetensors", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _write(m / "model.safetensors", b"")), "--out", d / "o"], "not a readable safetensors"),
    Case("export-random-safetensors", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _write(m / "model.safetensors", _junk(9000, 5))), "--out", d / "o"],
         "not a readable safetensors"),
    Case("export-swapped-tokenizer", lambda w, d: ["export", "--model", _model_copy(w, d, _swap_tok(w)),
                                                   "--out", d / "o"], "not the ones its weights"),
    # generate
    Case("generate-empty-prompt", lambda w, d: ["generate", "--model", w.model, "--prompt", ""], "empty"),
    Case("generate-blank-prompt", lambda w, d: ["generate", "--model", w.model, "--prompt", "   "], "empty"),
    Case("generate-huge-max-new-tokens", lambda w, d: ["generate", "--model", w.model, "--prompt", "the",
                                                       "--max-new-tokens", "100000000"], "context"),
    Case("generate-temperature-nan", lambda w, d: _gen(w.model, "--temperature", "nan"), "temperature"),
    Case("generate-temperature-inf", lambda w, d: _gen(w.model, "--temperature", "inf"), "temperature"),
    Case("generate-temperature-negative", lambda w, d: _gen(w.model, "--temperature", "-1"), "temperature"),
    Case("generate-top-p-zero", lambda w, d: _gen(w.model, "--temperature", "1", "--top-p", "0"), "top_p"),
    Case("generate-top-p-above-one", lambda w, d: _gen(w.model, "--temperature", "1", "--top-p", "1.5"), "top_p"),
    Case("generate-top-k-negative", lambda w, d: _gen(w.model, "--temperature", "1", "--top-k", "-3"), "top_k"),
    Case("generate-missing-model", lambda w, d: _gen(d / "nope"), "config.json is missing"),
    Case("generate-truncated-safetensors", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _truncate(m / "model.safetensors"))), "not a readable safetensors"),
    Case("generate-config-garbage", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _write(m / "config.json", _junk(500, 6)))), "not valid json"),
    Case("generate-config-mistyped", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _retype_config(m, n_layers=[1, 2]))), "model.n_layers"),
    Case("generate-swapped-tokenizer", lambda w, d: _gen(_model_copy(w, d, _swap_tok(w))),
         "not the ones its weights"),
    # eval
    Case("eval-out-is-data", lambda w, d: ["eval", "--model", w.model, "--task", "ppl", "--data",
                                           (f := _write(d / "t.txt", "some text")), "--out", f], "inputs"),
    Case("eval-out-foreign-file", lambda w, d: ["eval", "--model", w.model, "--task", "ppl", "--data",
                                                _write(d / "t.txt", "some text"), "--out",
                                                _write(d / "notes.json", '{"mine": 1}')], "--overwrite"),
    Case("eval-out-proc", lambda w, d: ["eval", "--model", w.model, "--task", "ppl", "--data",
                                        _write(d / "t.txt", "some text"), "--out", "/proc/x.json"], "/proc"),
    Case("eval-out-dir", lambda w, d: ["eval", "--model", w.model, "--task", "ppl", "--data",
                                       _write(d / "t.txt", "some text"), "--out", _user_folder(d)], "directory"),
    Case("eval-missing-data", lambda w, d: ["eval", "--model", w.model, "--task", "ppl", "--data", d / "no.txt"],
         "does not exist"),
    # tokenizer train
    Case("tokenizer-out-foreign", lambda w, d: ["tokenizer", "train", "--input", w.corpus, "--vocab-size", "300",
                                                "--out", _user_folder(d)], "--overwrite"),
    Case("tokenizer-out-is-input", lambda w, d: ["tokenizer", "train", "--input", (f := _write(d / "c.txt", "x")),
                                                 "--vocab-size", "300", "--out", f], "inputs"),
    Case("tokenizer-out-holds-input", lambda w, d: ["tokenizer", "train", "--input", _write(d / "c.txt", "x"),
                                                    "--vocab-size", "300", "--out", d], "holds the input"),
    Case("tokenizer-out-proc", lambda w, d: ["tokenizer", "train", "--input", w.corpus, "--vocab-size", "300",
                                             "--out", "/proc/tok"], "/proc"),
    # tokenizer extend
    Case("extend-out-is-base", lambda w, d: ["tokenizer", "extend", "--base", w.model, "--input", w.corpus,
                                             "--add", "8", "--out", w.model], "inputs"),
    Case("extend-out-holds-base", lambda w, d: ["tokenizer", "extend", "--base", w.model, "--input", w.corpus,
                                                "--add", "8", "--out", w.run], "holds the input"),
    Case("extend-out-foreign", lambda w, d: ["tokenizer", "extend", "--base", w.model, "--input", w.corpus,
                                             "--add", "8", "--out", _user_folder(d)], "--overwrite"),
    Case("extend-swapped-tokenizer", lambda w, d: ["tokenizer", "extend", "--base", _model_copy(w, d, _swap_tok(w)),
                                                   "--input", w.corpus, "--add", "8", "--out", d / "o"],
         "not the ones its weights"),
    # report
    Case("report-missing-run", lambda w, d: ["report", d / "nope"], "does not exist"),
    Case("report-config-alias-bomb", lambda w, d: ["report", _run_copy(w, d, "config.yaml", BOMB)], "alias"),
    Case("report-metrics-binary", lambda w, d: ["report", _run_copy(w, d, "metrics.jsonl", _junk(5000, 8))],
         "no training rows"),
    Case("report-metrics-deep", lambda w, d: ["report", _run_copy(w, d, "metrics.jsonl", _deep_json(5000))],
         "no training rows"),
    # prepare
    Case("prepare-out-is-tokenizer", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", w.tok,
                                                   "--out", w.tok], "inputs"),
    Case("prepare-out-holds-input", lambda w, d: ["prepare", "--input", _write(d / "c.txt", "x" * 40),
                                                  "--tokenizer", w.tok, "--out", d], "holds the input"),
    Case("prepare-out-foreign", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", w.tok,
                                              "--out", _user_folder(d)], "--overwrite"),
    Case("prepare-out-proc", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", w.tok,
                                           "--out", "/proc/shards"], "/proc"),
    Case("prepare-tokenizer-garbage", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", _garbage_tok(w, d),
                                                    "--out", d / "o", "--no-progress"], "tokenizer"),
    # prepare: hostile data files (issue 22)
    Case("prepare-jsonl-deep", lambda w, d: _prep(w, d, _write(d / "d.jsonl", '{"text": "fine text here"}\n'
                                                               '{"text": ' + _deep_json(100000) + "}\n")),
         "d.jsonl:2: json nested deeper"),
    Case("prepare-json-deep", lambda w, d: _prep(w, d, _write(d / "d.json", _deep_json(100000))), "nested deeper"),
    Case("prepare-decontaminate-deep", lambda w, d: _prep(w, d, w.corpus, "--decontaminate", _write(
        d / "set.jsonl", '{"q": ' + _deep_json(100000) + "}\n")), "set.jsonl:1: json nested deeper"),
    Case("prepare-decontaminate-empty", lambda w, d: _prep(w, d, w.corpus, "--decontaminate",
                                                           _write(d / "set.jsonl", "")), "holds no items"),
    Case("prepare-decontaminate-dir", lambda w, d: _prep(w, d, w.corpus, "--decontaminate",
                                                         _write(d / "sets" / "a.jsonl", "").parent), "is a directory"),
    Case("prepare-quality-config-mistyped", lambda w, d: _prep(
        w, d, w.corpus, "--quality", "gopher", "--quality-config",
        '{"gopher_repetition": {"dup_ngram_char_frac": {"5": "x"}}}'), "dup_ngram_char_frac.5"),
    Case("prepare-quality-config-list", lambda w, d: _prep(w, d, w.corpus, "--quality", "gopher",
                                                           "--quality-config", "[1,2]"), "must be a json object"),
    Case("prepare-input-symlink-loop", lambda w, d: _prep(w, d, _loop(d)), "symbolic link loop"),
    Case("prepare-out-symlink-loop", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", w.tok, "--out",
                                                   _loop(d), "--no-progress"], "symbolic link loop"),
]


# ---- issue 22: chat templates, model config sizes, second writers -------------------------------------

LONG_PROMPT = "the quick brown fox " * 150  # 3,000 characters: a loop nested three deep over it never ends
TEMPLATES = {
    "nested-loops": "{% for m in messages %}{% for a in m['content'] %}{% for b in m['content'] %}"
                    "{% for c in m['content'] %}{% endfor %}{% endfor %}{% endfor %}{{ m['content'] }}{% endfor %}",
    "macro-recursion": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(messages[0]['content']) }}",
    "macro-doubling": "{% macro f(x) %}{{ f(x ~ x) }}{% endmacro %}{{ f(messages[0]['content']) }}",
    "string-multiplication": "{{ messages[0]['content'] * 1000000000 }}",
    "join-amplification": "{{ ([messages[0]['content']] * 4000000)|join }}",
    "format-width": "{{ '%999999999d' % 1 }}",
}
TEMPLATE_EXPECT = {"nested-loops": "within 5 s", "macro-recursion": "recursed", "macro-doubling": "size",
                   "string-multiplication": "repetition", "join-amplification": "repetition",
                   "format-width": "wider than the size limit"}


def _template(name: str) -> Callable[[Path], None]:
    return lambda m: _write(m / "chat_template.jinja", TEMPLATES[name])


def _hf_copy(w: World, d: Path, **fields) -> Path:
    h = _copy(w.hf, d / "hf")
    data = json.loads((h / "config.json").read_text())
    data.update(fields)
    (h / "config.json").write_text(json.dumps(data))
    return h


_HELD_FDS: list[int] = []


def _held(lock_file: Path, command: str) -> None:
    """Hold ``lock_file`` as a live writer would (the flock on its own open file, the holder's JSON in it), so
    the command under test meets a second writer; released after the case."""
    import fcntl
    import socket

    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                             "started": "2026-12-07T20:00:00Z"}).encode())
    _HELD_FDS.append(fd)


def _release_held() -> None:
    while _HELD_FDS:
        os.close(_HELD_FDS.pop())


def _locked_out(d: Path, command: str) -> Path:
    from lmforge.lock import output_lock_path

    _held(output_lock_path(d / "o"), command)
    return d / "o"


CASES += [
    *(Case(f"generate-template-{name}", lambda w, d, name=name: [
        "generate", "--model", _model_copy(w, d, _template(name)), "--chat", "--prompt", LONG_PROMPT,
        "--max-new-tokens", "4"], TEMPLATE_EXPECT[name]) for name in TEMPLATES),
    Case("generate-config-dim-huge", lambda w, d: _gen(_model_copy(w, d, lambda m: _retype_config(m, dim=10**9))),
         "model.dim=1,000,000,000"),
    Case("generate-config-layers-huge", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _retype_config(m, n_layers=10**9))), "model.n_layers=1,000,000,000"),
    Case("generate-config-vocab-huge", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _retype_config(m, vocab_size=10**9))), "model.vocab_size=1,000,000,000"),
    Case("generate-config-heads-huge", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _retype_config(m, n_heads=10**9))), "model.n_heads"),
    Case("generate-config-ffn-huge", lambda w, d: _gen(_model_copy(
        w, d, lambda m: _retype_config(m, ffn_hidden=10**9))), "model.ffn_hidden=1,000,000,000"),
    Case("export-config-dim-huge", lambda w, d: ["export", "--model", _model_copy(
        w, d, lambda m: _retype_config(m, dim=10**9)), "--out", d / "o"], "model.dim=1,000,000,000"),
    Case("export-gguf-config-dim-huge", lambda w, d: ["export", "--format", "gguf", "--model", _model_copy(
        w, d, lambda m: _retype_config(m, dim=10**9)), "--out", d / "o"], "model.dim=1,000,000,000"),
    Case("export-gguf-config-layers-huge", lambda w, d: ["export", "--format", "gguf", "--model", _model_copy(
        w, d, lambda m: _retype_config(m, n_layers=10**9)), "--out", d / "o"], "model.n_layers=1,000,000,000"),
    Case("import-config-hidden-size-huge", lambda w, d: ["import", "--hf", _hf_copy(w, d, hidden_size=10**9),
                                                         "--out", d / "o"], "hidden_size=1,000,000,000"),
    Case("import-config-layers-huge", lambda w, d: ["import", "--hf", _hf_copy(w, d, num_hidden_layers=10**9),
                                                    "--out", d / "o"], "says 1,000,000,000 layers"),
    Case("import-config-vocab-huge", lambda w, d: ["import", "--hf", _hf_copy(w, d, vocab_size=10**9),
                                                   "--out", d / "o"], "vocab_size=1,000,000,000"),
    Case("import-out-locked", lambda w, d: ["import", "--hf", w.hf, "--out", _locked_out(d, "lmforge import")],
         "is being written by pid"),
    Case("export-out-locked", lambda w, d: ["export", "--model", w.model, "--out", _locked_out(d, "lmforge export")],
         "is being written by pid"),
    Case("tokenizer-train-out-locked", lambda w, d: [
        "tokenizer", "train", "--input", w.corpus, "--vocab-size", "300", "--out",
        _locked_out(d, "lmforge tokenizer train")], "is being written by pid"),
    Case("extend-out-locked", lambda w, d: ["tokenizer", "extend", "--base", w.model, "--input", w.corpus, "--add",
                                            "8", "--out", _locked_out(d, "lmforge tokenizer extend")],
         "is being written by pid"),
    Case("prepare-out-locked", lambda w, d: ["prepare", "--input", w.corpus, "--tokenizer", w.tok, "--out",
                                             _locked_out(d, "lmforge prepare"), "--no-progress"],
         "is being written by pid"),
]


def _prep(w: World, d: Path, inp: Path, *extra) -> list:
    return ["prepare", "--input", inp, "--tokenizer", w.tok, "--out", d / "o", "--txt-mode", "line",
            "--no-progress", *extra]


def _loop(d: Path) -> Path:
    (d / "loop_a").symlink_to(d / "loop_b")
    (d / "loop_b").symlink_to(d / "loop_a")
    return d / "loop_a"


def _retype_config(m: Path, **fields) -> None:
    data = json.loads((m / "config.json").read_text())
    data["model"].update(fields)
    (m / "config.json").write_text(json.dumps(data))


def _run_copy(w: World, d: Path, name: str, content: str | bytes) -> Path:
    r = d / "run"
    r.mkdir()
    for f in ("config.yaml", "metrics.jsonl"):
        shutil.copy(w.run / f, r / f)
    _write(r / name, content)
    return r


def _garbage_tok(w: World, d: Path) -> Path:
    t = _copy(w.tok, d / "tok")
    (t / "tokenizer.json").write_bytes(_junk(3000, 7))
    return t


def _truncated_ck(w: World, d: Path) -> Path:
    c = _copy(w.run / "checkpoints" / "step_000002", d / "ck" / "step_000002")
    _truncate(c / "__0_0.distcp")
    return c


def _tally(config) -> dict:
    if not hasattr(config, "_lmforge_robustness"):
        config._lmforge_robustness = {"tried": 0, "subprocess": 0, "tracebacks": 0, "files_lost": 0,
                                      "partial": 0, "not_refused": 0, "over_memory": 0, "over_time": 0,
                                      "max_mb": (0.0, ""), "max_s": (0.0, "")}
    return config._lmforge_robustness


def _check(case: Case, w: World, d: Path, before: dict, rc, err: str, raised: bool, tally: dict,
           seconds: float, mb: float) -> None:
    after = snapshot(w.root)
    lost = [k for k in before if after.get(k) != before[k]]
    added = [k for k in after if k not in before]
    tally["tried"] += 1
    tally["tracebacks"] += int(raised or "Traceback" in err)
    tally["files_lost"] += len(lost)
    tally["partial"] += len(added)
    tally["not_refused"] += int(rc in (0, None))
    tally["over_memory"] += int(mb > case.max_mb)
    tally["over_time"] += int(seconds > case.max_s)
    tally["max_mb"] = max(tally["max_mb"], (round(mb, 1), case.name))
    tally["max_s"] = max(tally["max_s"], (round(seconds, 1), case.name))
    assert not raised and "Traceback" not in err, f"{case.name}: traceback\n{err[-3000:]}"
    assert rc not in (0, None), f"{case.name}: exit {rc}\n{err[-2000:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"{case.name}: stderr\n{err[-2000:]}"
    assert case.expect.lower() in errors[0].lower(), f"{case.name}: {errors[0]}"
    assert not lost, f"{case.name}: changed or lost {lost[:5]}"
    assert not added, f"{case.name}: left {added[:5]}"
    assert not (d / "pwned").exists()
    assert seconds <= case.max_s, f"{case.name}: took {seconds:.1f} s, over its bound of {case.max_s:g} s"
    assert mb <= case.max_mb, f"{case.name}: peak RSS {mb:,.0f} MiB, over its bound of {case.max_mb:,.0f} MiB"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(case, world, request):
    d = world.root / "cases" / case.name
    d.mkdir(parents=True)
    argv = case.build(world, d)
    before = snapshot(world.root)
    try:
        t0 = time.monotonic()
        with PeakRSS() as peak:
            rc, _, err, raised = cli(argv)
        seconds = time.monotonic() - t0
    finally:
        _release_held()
    _check(case, world, d, before, rc, err, raised, _tally(request.config), seconds, peak.mb)


SUBPROCESS_CASES = ["pretrain-yaml-alias-bomb", "generate-temperature-nan", "export-out-is-run-dir",
                    "generate-template-nested-loops", "generate-config-dim-huge", "import-config-hidden-size-huge",
                    "resume-pickle-in-metadata"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_a_real_process(name, world, request):
    case = next(c for c in CASES if c.name == name)
    d = world.root / "cases" / f"proc-{name}"
    d.mkdir(parents=True)
    argv = [str(a) for a in case.build(world, d)]
    before = snapshot(world.root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    rc, _, err, mb = run_process([sys.executable, "-m", "lmforge", *argv], env, timeout=600)
    seconds = time.monotonic() - t0
    tally = _tally(request.config)
    tally["subprocess"] += 1
    assert rc == 2, err[-2000:]
    # through a real process the bounds hold the whole process: interpreter, torch and all
    _check(case, world, d, before, rc, err, False, tally, seconds, mb)


@pytest.mark.parametrize("victim", ["rank_00000.json", ".metadata", "__0_0.distcp"])
def test_resume_falls_back_past_a_truncated_checkpoint(world, victim, tmp_path):
    """The real Trainer through the CLI: the newest checkpoint is cut short, the run resumes from the one
    before, names the one it skipped and why, and finishes."""
    run = _copy(world.run, tmp_path / "run")
    _truncate(run / "checkpoints" / "step_000002" / victim)
    rc, out, err, raised = cli(["pretrain", "--config", world.pre_cfg, f"run.dir={run}", "train.max_steps=3",
                                "--json"])
    assert rc == 0 and not raised, err[-3000:]
    assert "skipping checkpoint" in err and "step_000002" in err and victim in err
    assert "resumed from" in err and "step_000001 at step 1" in err
    assert json.loads(out)["step"] == 3


def test_quickstart_refuses_a_foreign_folder(tmp_path):
    folder = _user_folder(tmp_path)
    before = snapshot(tmp_path)
    rc, _, err, raised = cli(["quickstart", "--out", folder, "--minutes", "0.1"])
    assert rc == 2 and not raised and err.strip().splitlines()[-1].startswith("error: --out=")
    assert "not an lmforge run dir" in err and snapshot(tmp_path) == before
