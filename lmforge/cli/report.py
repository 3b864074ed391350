"""`lmforge report RUN_DIR`: loss / val-loss / lr curves as RUN/report.png and a markdown summary RUN/report.md."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import UserError
from lmforge.console import emit

HELP = "draw a run's loss, validation loss and learning-rate curves (PNG) and write a markdown summary"


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `lmforge pretrain`")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args) -> int:
    from lmforge.train.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir '{run_dir}' does not exist; pass the run.dir of a pretraining run")
    s, png, md = write_report(run_dir)
    val = f", val loss {s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else ""
    loss = f", loss {s['final_loss']:.4f}" if s.get("final_loss") is not None else ""
    emit(args, f"report: {s['steps']:,} steps{loss}{val}; wrote {png} and {md}",
         {**s, "png": str(png), "markdown": str(md)})
    return 0
