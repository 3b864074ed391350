"""The CLI package: one module per verb, each with ``HELP``, ``add_arguments`` and ``run``; building the whole
parser (what the docs' CLI reference is generated from) registers every verb's arguments without importing
torch."""

import argparse
import subprocess
import sys

from lmforge import cli

VERBS = ["quickstart", "model", "tokenizer", "prepare", "pretrain", "finetune", "eval", "generate", "export",
         "import", "plan", "report", "serve", "dashboard"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def test_every_verb_is_a_module_with_help_arguments_and_run():
    assert list(cli.COMMANDS) == VERBS
    for verb, module in cli.COMMANDS.items():
        assert module.__name__.startswith("lmforge.cli."), verb
        assert isinstance(module.HELP, str) and module.HELP, verb
        assert callable(module.add_arguments) and callable(module.run), verb


def test_the_parser_registers_every_verb_and_its_arguments():
    verbs = _subparsers(cli.build_parser())
    assert list(verbs) == VERBS
    for verb, parser in verbs.items():  # each verb has options of its own (beyond -h) or subcommands
        own = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
        assert own, verb
    assert set(_subparsers(verbs["tokenizer"])) == {"train", "eval", "extend"}
    assert set(_subparsers(verbs["model"])) == {"list", "info"}
    args = cli.build_parser().parse_args(["tokenizer", "extend", "--base", "m", "--input", "c.txt", "--add", "8",
                                          "--out", "o"])
    assert args._run is cli.COMMANDS["tokenizer"].run and args.add == 8 and args.txt_mode == "line"


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from lmforge.cli import build_parser; p = build_parser(); "
            "p.parse_args(['eval', '--model', 'm', '--task', 'ppl']); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_python_m_lmforge_cli_is_the_same_command():
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "--version"], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and r.stdout.startswith("lmforge "), r.stderr
    r = subprocess.run([sys.executable, "-m", "lmforge", "model", "info", "no-such-preset"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
