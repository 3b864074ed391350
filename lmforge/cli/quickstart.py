"""`lmforge quickstart`: train a small model on the running Python's standard library sources in a few
minutes, no download (the pipeline itself: lmforge.tasks.quickstart)."""

from __future__ import annotations

from lmforge.console import emit

HELP = "train a small model on Python's standard library sources in a few minutes (no download); re-run resumes"


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/quickstart", help="output dir (data, checkpoints, model, report)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget (default 5)")
    p.add_argument("--preset", default="small", help="model preset (default small; tiny for a smoke run)")
    p.add_argument("--data-mb", type=float, default=None,
                   help="use only the first MB of the sources (default: all of them, ~12 MB on CPython 3.11)")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from lmforge.outputs import run_dir_claim
    from lmforge.tasks.quickstart import quickstart
    from lmforge.train.metrics import format_duration

    with run_dir_claim(args.out, "lmforge quickstart", key="--out"):  # never into a folder it did not create
        r = quickstart(args.out, args.minutes, args.preset, args.data_mb)
    val = ""
    if r["first_val_loss"] is not None and r["final_val_loss"] is not None:
        bpb = f", {r['final_val_bpb']:.2f} bits/byte" if r.get("final_val_bpb") else ""
        val = f", val loss {r['first_val_loss']:.2f} -> {r['final_val_loss']:.2f}{bpb}"
    if r["model_dir"] is None:  # stopped early: no model yet; a re-run resumes
        emit(args, f"quickstart: stopped at step {r['steps']:,} ({r['tokens']:,} tokens) in "
                   f"{format_duration(r['seconds'])}{val}; no model yet: run it again to finish; report {r['report']}", r)
        return r["exit_code"]
    emit(args, f"quickstart: {r['steps']:,} steps ({r['tokens']:,} tokens) in {format_duration(r['seconds'])}{val}; "
               f"try `lmforge generate --model {r['model_dir']} --prompt 'import os'`; report {r['report']}", r)
    return 0
