"""`lmforge` command line: one module per verb, registered in ``COMMANDS``. No logic lives here.

Each verb module defines ``HELP``, ``add_arguments(parser)`` (argparse only, so that building the parser
imports no torch) and ``run(args)``. ``run`` imports the packages it drives inside the function: the CLI
is the one place in lmforge with lazy imports, so that ``lmforge model info`` and ``lmforge --help`` answer
instantly and ``build_parser()`` (which the docs use for the CLI reference) stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys

import lmforge
from lmforge.cli import (
    dashboard,
    export,
    finetune,
    generate,
    import_,
    model,
    plan,
    prepare,
    pretrain,
    quickstart,
    report,
    serve,
    tokenizer,
)
from lmforge.cli import eval as eval_
from lmforge.config import UserError
from lmforge.interrupts import sigterm_raises

COMMANDS = {
    "quickstart": quickstart,
    "model": model,
    "tokenizer": tokenizer,
    "prepare": prepare,
    "pretrain": pretrain,
    "finetune": finetune,
    "eval": eval_,
    "generate": generate,
    "export": export,
    "import": import_,
    "plan": plan,
    "report": report,
    "serve": serve,
    "dashboard": dashboard,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train 7B-class language models end to end.")
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        with sigterm_raises():  # SIGTERM unwinds through cleanup (atomic writes leave no temp dir), exit 143
            rc = args._run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)

