"""The package layers are one-way: a module imports only from its own layer or the layers below it.

Every ``lmforge/**.py`` is parsed with `ast` — top-level and function-level (lazy) imports alike — and an
import of a higher layer, or of a sibling that is not below it, fails with the offending file and line.

    layer 0  lmforge.{__init__,config,atomic,console,outputs}   shared basics
    layer 1  tokenizer, data, models, planner            (the planner reads model configs only;
                                                         models never read data or tokenizers)
    layer 2  distributed
    layer 3  train, eval, generate                       eval and generate sit beside train, not on it
    layer 4  tasks                                       (every way of training; reuses train, eval and generate)
             serve                                       (the HTTP server over generate; never tasks)
    layer 5  cli, __main__, and every package's command modules (``*/commands.py``,
             ``*_command.py``): argument parsing and checks that glue a subcommand to its package;
             nothing below them may import one
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmforge

PACKAGE = Path(lmforge.__file__).parent

LAYERS: dict[str, int] = {
    "__init__": 0, "config": 0, "atomic": 0, "console": 0, "outputs": 0, "interrupts": 0,
    "tokenizer": 1, "data": 1, "models": 1, "planner": 1,
    "distributed": 2,
    "train": 3, "eval": 3, "generate": 3,
    "tasks": 4, "serve": 4,
    "cli": 5, "__main__": 5,
    "finetune": 5,  # only the command module of `lmforge finetune` is left there (the tasks are in lmforge.tasks)
}
# Packages on one layer that must not import each other: (importer, imported).
FORBIDDEN_SIBLINGS = {("eval", "train"), ("generate", "train"), ("generate", "eval"),
                      ("planner", "tokenizer"), ("planner", "data"),
                      ("models", "planner"), ("models", "data"), ("models", "tokenizer"),
                      ("serve", "tasks"), ("tasks", "serve")}


COMMAND_LAYER = "commands"  # the pseudo-package of all command modules (layer 5)
LAYERS[COMMAND_LAYER] = 5


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lmforge":
        return None
    if len(parts) > 2 and (parts[-1] == "commands" or parts[-1].endswith("_command")):
        return COMMAND_LAYER
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts)


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (lazy imports in functions and
    ``importlib.import_module("lmforge...")`` with a literal name included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return sorted(found)


def file_violations(path: Path, module: str) -> list[str]:
    me = _part(module)
    if me not in LAYERS:
        return [f"{path}: package part '{me}' has no layer; add it to LAYERS in this test"]
    bad = []
    for line, mod in _imports(path, module):
        other = _part(mod)
        if other is None or other == me:
            continue
        if other not in LAYERS:
            bad.append(f"{path}:{line}: imports {mod}, whose package has no layer")
        elif LAYERS[other] > LAYERS[me] or (me, other) in FORBIDDEN_SIBLINGS:
            bad.append(f"{path}:{line}: {me} (layer {LAYERS[me]}) imports {mod} (layer {LAYERS[other]})")
    return bad


def violations() -> list[str]:
    return [v for path in sorted(PACKAGE.rglob("*.py")) for v in file_violations(path, _module_of(path))]


def test_layers_are_one_way():
    files = list(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    bad = violations()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_checker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n"
                     "from ..models import lora\n"
                     "def f():\n"
                     "    from lmforge.tasks.run import run\n"
                     "    import importlib\n"
                     "    return importlib.import_module('lmforge.train.trainer')\n", encoding="utf-8")
    assert [m for _, m in _imports(probe, "lmforge.eval.probe")] == [
        "os", "lmforge.models", "lmforge.tasks.run", "importlib", "lmforge.train.trainer"]
    bad = file_violations(probe, "lmforge.eval.probe")
    assert len(bad) == 2
    assert ":4: eval (layer 3) imports lmforge.tasks.run (layer 4)" in bad[0]
    assert ":6: eval (layer 3) imports lmforge.train.trainer" in bad[1]  # a forbidden sibling
    assert file_violations(probe, "lmforge.tasks.probe") == []  # tasks may use train and models
    assert "no layer" in file_violations(probe, "lmforge.newpkg.probe")[0]
    # command modules are the CLI layer: they may import anything, nothing below may import them
    assert file_violations(probe, "lmforge.eval.commands") == []
    below = tmp_path / "below.py"
    below.write_text("from lmforge.train.commands import run\n", encoding="utf-8")
    assert "train (layer 3) imports lmforge.train.commands (layer 5)" in file_violations(below, "lmforge.train.x")[0]
