"""`lmforge` command line: subcommand -> module. No logic lives here.

Each command module defines ``HELP``, ``add_arguments(parser)`` and ``run(args)``; modules import
torch and friends inside ``run`` so that ``lmforge model info`` answers instantly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmforge.config import UserError

COMMANDS: dict[str, str] = {
    "quickstart": "lmforge.tasks.quickstart",
    "model": "lmforge.models.commands",
    "tokenizer": "lmforge.tokenizer.commands",
    "prepare": "lmforge.data.commands",
    "pretrain": "lmforge.train.commands",
    "finetune": "lmforge.finetune.commands",
    "eval": "lmforge.eval.commands",
    "generate": "lmforge.generate.commands",
    "export": "lmforge.models.hf.export_command",
    "import": "lmforge.models.hf.import_command",
    "plan": "lmforge.planner.commands",
    "report": "lmforge.train.report",
    "serve": "lmforge.serve.commands",
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:  # a stage not installed in this build
        if e.name and module_name.startswith(e.name):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train 7B-class language models end to end.")
    parser.add_argument("--version", action="version", version=f"lmforge {__import__('lmforge').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
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
    from lmforge.interrupts import sigterm_raises

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


if __name__ == "__main__":
    raise SystemExit(main())
