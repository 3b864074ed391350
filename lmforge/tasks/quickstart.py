"""The quickstart (`lmforge quickstart`, lmforge.cli.quickstart): the whole pipeline on text every machine has — the running Python's standard
library sources — in a few minutes, no download.

    stdlib *.py -> tokenizer -> token shards -> pretrain the `small` preset -> evaluate -> sample -> report

Everything lands in ``--out`` (default ``runs/quickstart``): ``data/tokenizer``, ``data/shards`` and the
run itself (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``model/``, ``report.png``, ``report.md``).
Each stage is skipped when its output exists, and training resumes from the last checkpoint, so
re-running continues instead of starting over. The step count is fitted to ``--minutes`` once, from a
short timing of the model on this machine, and then kept in ``config.yaml``.
"""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import UserError, from_dict, load_recipe
from lmforge.console import info
from lmforge.data.prepare import prepare
from lmforge.generate.engine import generate
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.tasks.run import run
from lmforge.tokenizer.core import load_tokenizer
from lmforge.tokenizer.train import train_tokenizer
from lmforge.train.config import PretrainConfig, load_config, resolve_precision, validate
from lmforge.train.optim import build_optimizer
from lmforge.train.report import write_report

# test suites, installed packages, and two dirs that are data more than code: codec tables (encodings/,
# a third of the bytes) and the pydoc topic texts
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
SAMPLE_PROMPT = "import os\n"

# The pretraining config the quickstart runs is the packaged recipe lmforge/recipes/quickstart.yaml
# (`lmforge pretrain --config quickstart` runs the same by hand); the quickstart fills in run.dir, data.dir and
# train.max_steps at run time, and scales the warmup and the eval/checkpoint intervals to the fitted steps.
RECIPE = "quickstart"


def quickstart_recipe() -> dict[str, Any]:
    """The quickstart's recipe as plain data (read from package data: lmforge/recipes/quickstart.yaml)."""
    return load_recipe(RECIPE)


def quickstart_model(preset: str) -> dict[str, Any]:
    """The quickstart's model section for ``preset``: the recipe's options, with the squared-ReLU width set to
    1.5x the preset's SwiGLU width (two matrices holding the parameters of three; 1152 for `small`)."""
    model = {**quickstart_recipe()["model"], "preset": preset}
    base = get_preset(preset)
    if model.get("activation") == "relu2" and base.activation == "swiglu":
        model["ffn_hidden"] = base.hidden_dim * 3 // 2
    return model


def stdlib_sources(limit_bytes: int | None = None) -> list[str]:
    """The standard library's .py files (no site-packages, no test suites), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            if size == 0:
                continue
            files.append(str(path))
            total += size
            if limit_bytes is not None and total >= limit_bytes:
                return files
    if not files:
        raise UserError(f"found no .py files under the standard library at {root}; is this a full Python install?")
    return files


def time_step(cfg, device) -> float:
    """Seconds per optimizer step of the real model shape on this machine (best of a few)."""
    mcfg = cfg.model_config()
    model = build_model(mcfg, device=device, seed=0)
    opt = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, mcfg.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1), generator=gen)
    batch = batch.to(device)
    accum = cfg.global_batch_size // cfg.train.micro_batch
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        for _ in range(accum):
            if autocast is not None:
                with autocast:
                    logits = model(batch[:, :-1])
            else:
                logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    # the best step is what the machine can do; a shared machine's slower ones are load from elsewhere
    return min(times) * 1.03  # + logging and checkpoint overhead


def fit_steps(cfg, minutes: float, per_step: float, evals: int = 5) -> int:
    """Steps that fill ``minutes``, leaving room for ``evals`` evaluations (forward only: ~1/3 of a step
    per micro-batch-sized batch)."""
    accum = cfg.global_batch_size // cfg.train.micro_batch
    eval_cost = per_step / accum / 3 * cfg.eval.batches * (cfg.eval.batch_size or cfg.train.micro_batch) \
        / cfg.train.micro_batch
    return max(20, int((minutes * 60 - evals * eval_cost) / per_step))


def prepare_data(data_dir: str | Path, preset: str = "small", data_mb: float | None = None) -> Path:
    """Steps 1-2 of the quickstart (also `bench/tokens_to_target.py`'s corpus): a BPE tokenizer of the preset's
    vocabulary trained on the standard-library sources, then token shards with 3% of the files held out.
    Each step is skipped when its output exists. Returns the shard dir (``DATA_DIR/shards``)."""
    tok_dir, shard_dir = Path(data_dir) / "tokenizer", Path(data_dir) / "shards"
    vocab = get_preset(preset).vocab_size  # the preset's vocabulary: the tokenizer is trained to fit it
    files: list[str] | None = None
    # 1. tokenizer
    if (tok_dir / "tokenizer.json").is_file():
        info(f"quickstart: tokenizer exists ({tok_dir}), skipping")
    else:
        files = stdlib_sources(int(data_mb * 1e6) if data_mb else None)
        size = sum(os.path.getsize(f) for f in files)
        info(f"quickstart: {len(files)} standard-library files ({size / 1e6:.1f} MB) from "
             f"{sysconfig.get_paths()['stdlib']}; training a {vocab:,}-token BPE tokenizer")
        train_tokenizer(files, vocab, tok_dir, txt_mode="file", progress=False)
    # 2. shards
    if (shard_dir / "index.json").is_file():
        info(f"quickstart: token shards exist ({shard_dir}), skipping")
    else:
        files = files or stdlib_sources(int(data_mb * 1e6) if data_mb else None)
        info("quickstart: tokenizing into shards (3% of the files held out for validation)")
        size = sum(os.path.getsize(f) for f in files)
        workers = 1 if size < 4e6 else min(4, os.cpu_count() or 1)  # worker start-up outweighs small inputs
        rep = prepare(files, tok_dir, shard_dir, val_fraction=0.03, workers=workers,
                      dedup="exact", txt_mode="file", overwrite=True, progress=False)
        info(f"quickstart: {rep['train_tokens']:,} train / {rep['val_tokens']:,} val tokens")
    return shard_dir


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 5.0, preset: str = "small",
               data_mb: float | None = None) -> dict[str, Any]:
    if minutes <= 0:
        raise UserError(f"--minutes={minutes} must be positive")
    if data_mb is not None and data_mb <= 0:
        raise UserError(f"--data-mb={data_mb} must be positive")
    t_start = time.perf_counter()
    out = Path(out)
    shard_dir = prepare_data(out / "data", preset, data_mb)
    # 3. pretraining config: fitted once, then reused so a re-run resumes the same schedule
    cfg_path = out / "config.yaml"
    if cfg_path.is_file():
        cfg = load_config(str(cfg_path), [f"run.dir={out}", f"data.dir={shard_dir}", "train.resume=auto"])
        info(f"quickstart: continuing the run in {out} ({cfg.train.max_steps} steps)")
    else:
        data = quickstart_recipe()
        data["model"] = quickstart_model(preset)
        data["run"] = {**data.get("run", {}), "dir": str(out)}
        data["data"] = {**data["data"], "dir": str(shard_dir)}
        cuda = torch.cuda.is_available()
        if cuda:  # bigger steps on a GPU
            data["train"].update(precision="bf16", global_batch=64, micro_batch=64)
        data["train"]["max_steps"] = 1000  # placeholder until timed below
        cfg = from_dict(PretrainConfig, data)
        device = torch.device("cuda" if cuda else "cpu")
        per_step = time_step(cfg, device)
        steps = fit_steps(cfg, minutes, per_step)
        if cuda:
            steps = min(steps, 3000)
        cfg.train.max_steps = steps
        cfg.schedule.warmup_steps = max(1, min(cfg.schedule.warmup_steps, steps // 10))
        cfg.eval.interval = cfg.checkpoint.interval = max(5, steps // 4)
        # a guard for a machine busier than when it was timed: stop (with a checkpoint) well past the budget;
        # running the quickstart again resumes and finishes the schedule. At least 3 minutes, so that short
        # smoke runs (which train the 20-step minimum) are not cut by a moment of load.
        cfg.train.time_limit_minutes = round(max(minutes * 1.5 + 0.5, 3.0), 2)
        validate(cfg)
        info(f"quickstart: {per_step:.2f} s/step here -> {steps} steps of {cfg.global_batch_size}x{cfg.data.seq_len} "
             f"tokens (~{minutes:g} min)")
    result = run(cfg).train
    if result.exit_code:  # the time guard (or a signal) stopped it: no RUN/model to sample from yet
        info(f"quickstart: stopped ({result.signal or result.stop_reason.replace('_', ' ')}) at step {result.step} "
             f"of {cfg.train.max_steps} (this machine is busier than when it was timed); run the quickstart again "
             "to finish the schedule")
        summary, png, md = write_report(out)
        return {"out": str(out), "model_dir": None, "report": str(md), "plot": str(png), "steps": result.step,
                "tokens": result.tokens, "stop_reason": result.stop_reason, "exit_code": result.exit_code,
                "first_val_loss": summary.get("first_val_loss"), "final_val_loss": summary.get("final_val_loss"),
                "final_val_bpb": summary.get("final_val_bpb"), "tok_per_s": result.tok_per_s, "mfu": result.mfu,
                "resumed_from": result.resumed_from, "sample": None,
                "seconds": round(time.perf_counter() - t_start, 1)}
    # 4. sample from the consolidated model dir (the same path `lmforge generate` takes)
    model = load_model_dir(out / "model").eval()
    tokenizer = load_tokenizer(out / "model")
    sample = SAMPLE_PROMPT + generate(model, SAMPLE_PROMPT, tokenizer, max_new_tokens=120, temperature=0.8,
                                      top_k=40, seed=0)
    info("quickstart: sample from RUN/model (temperature 0.8, top-k 40):\n" + "-" * 60 + "\n" + sample + "\n"
         + "-" * 60)
    # 5. report
    summary, png, md = write_report(out, extra={"Sample": f"Prompt `{SAMPLE_PROMPT!r}`, temperature 0.8, top-k 40:\n\n"
                                                          f"```python\n{sample}\n```"})
    return {"out": str(out), "model_dir": str(out / "model"), "report": str(md), "plot": str(png),
            "steps": result.step, "tokens": result.tokens, "stop_reason": result.stop_reason,
            "first_val_loss": summary.get("first_val_loss"), "final_val_loss": summary.get("final_val_loss"),
            "final_val_bpb": summary.get("final_val_bpb"), "tok_per_s": result.tok_per_s, "mfu": result.mfu,
            "resumed_from": result.resumed_from, "sample": sample, "exit_code": 0,
            "seconds": round(time.perf_counter() - t_start, 1)}

