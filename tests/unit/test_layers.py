"""The package layers are one-way and acyclic: a module imports only from its own layer or the layers below
it, no two modules import each other (directly or around a loop) at import time, and no two packages of one
layer import each other at all.

Every ``lmforge/**.py`` is parsed with `ast` — top-level and function-level (lazy) imports alike — and an
import of a higher layer, or of a sibling that is not below it, fails with the offending file and line.

    layer 0  lmforge.{__init__,config,atomic,console,outputs,interrupts}   shared basics
             lmforge.{sources,web_inputs}                reading documents (files, URLs, WARC / HTML)
    layer 1  tokenizer, data, models, planner            (the planner reads model configs only;
                                                         models never read data or tokenizers;
                                                         data tokenizes, the tokenizer never reads shards)
    layer 2  distributed
             artifacts                                   the one reader/writer of model, adapter, classifier and
                                                         reward dirs, HF / GGUF interop, consolidation
                                                         (reads models, tokenizer and config; never train/eval/…)
    layer 3  train, eval, generate                       eval and generate sit beside train, not on it
    layer 4  tasks                                       (every way of training; reuses train, eval and generate)
             serve                                       (the HTTP server over generate; never tasks)
             dashboard                                   (the runs page; reads run dirs, reuses serve's guard)
    layer 5  cli (one module per verb), __main__         argument parsing and checks that glue a verb to its
                                                         package; nothing below them may import one

Cycles: the graph of module-level imports (those that run when a module is imported; ``if TYPE_CHECKING:``
blocks excluded) has no strongly connected component of more than one module, and the graph of packages
(every import, lazy ones included) has none of more than one package — so a cycle between two packages of
one layer (tokenizer <-> data) fails even while one side imports lazily.

Dynamic imports: ``importlib.import_module`` / ``__import__`` with a literal name are checked like any
import; with a computed name they are refused outside ``lmforge/cli/`` (the one place where laziness lives),
since this test could not see what they import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import lmforge

PACKAGE = Path(lmforge.__file__).parent

LAYERS: dict[str, int] = {
    "__init__": 0, "config": 0, "atomic": 0, "console": 0, "outputs": 0, "interrupts": 0, "lock": 0, "errors": 0,
    "sources": 0, "web_inputs": 0,
    "tokenizer": 1, "data": 1, "models": 1, "planner": 1,
    "distributed": 2, "artifacts": 2,
    "train": 3, "eval": 3, "generate": 3,
    "tasks": 4, "serve": 4, "dashboard": 4,
    "cli": 5, "__main__": 5,
}
# Packages on one layer that must not import each other: (importer, imported).
FORBIDDEN_SIBLINGS = {("eval", "train"), ("generate", "train"), ("generate", "eval"),
                      ("planner", "tokenizer"), ("planner", "data"),
                      ("models", "planner"), ("models", "data"), ("models", "tokenizer"),
                      ("tokenizer", "data"),
                      ("serve", "tasks"), ("tasks", "serve"), ("dashboard", "tasks"), ("tasks", "dashboard"),
                      ("serve", "dashboard"),
                      ("artifacts", "distributed")}  # distributed reads model dirs; artifacts uses torch.distributed only
# The one package whose modules may import a name computed at run time (the CLI lazy verb loading).
DYNAMIC_IMPORTS_ALLOWED = "cli"


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lmforge":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _module_of(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    return ".".join(rel.parts)


def _dynamic_call(node: ast.AST) -> bool:
    """``importlib.import_module(…)``, ``import_module(…)`` or ``__import__(…)``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


def _literal(node: ast.Call) -> str | None:
    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def _top_level(body: list[ast.stmt]) -> Iterable[ast.AST]:
    """Every node that runs when the module is imported: not inside a function (a class body runs),
    not under ``if TYPE_CHECKING:``."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (d for dec in stmt.decorator_list for d in ast.walk(dec))
            continue
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            yield from _top_level(stmt.orelse)
            continue
        yield stmt
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(stmt, field, None)
            if isinstance(children, list):
                yield from _top_level(children)
        if not isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While, ast.ClassDef, ast.ExceptHandler)):
            yield from ast.walk(stmt)
        elif isinstance(stmt, (ast.If, ast.While)):
            yield from ast.walk(stmt.test)


def _imports(path: Path, module: str, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, at any depth (lazy imports in functions and
    ``importlib.import_module("lmforge...")`` with a literal name included); with ``top_level_only`` only
    those that run when the module is imported, where ``from X import a`` gives ``X.a`` (``a`` may be a
    submodule or a name defined in ``X``: the import graph resolves which)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    nodes = _top_level(tree.body) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {(node.lineno, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if top_level_only:  # ``a`` is a submodule or a name of ``X``: the graph resolves which
                found |= {(node.lineno, f"{mod}.{a.name}" if a.name != "*" else mod) for a in node.names}
            else:
                found.add((node.lineno, mod))
        elif _dynamic_call(node) and _literal(node) is not None:
            found.add((node.lineno, _literal(node)))
    return sorted(found)


def dynamic_imports(path: Path) -> list[int]:
    """Lines of ``import_module`` / ``__import__`` calls whose name is computed (not a string literal)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return sorted(node.lineno for node in ast.walk(tree) if _dynamic_call(node) and _literal(node) is None)


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
    if me != DYNAMIC_IMPORTS_ALLOWED:
        bad += [f"{path}:{line}: import_module / __import__ of a computed name (only lmforge/cli/ may import "
                "lazily by name; import the module by its name)" for line in dynamic_imports(path)]
    return bad


def violations() -> list[str]:
    return [v for path in sorted(PACKAGE.rglob("*.py")) for v in file_violations(path, _module_of(path))]


# ---- cycles -----------------------------------------------------------------------------------------
def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, a package by its own name (``lmforge.data`` for data/__init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        name = _module_of(path, package)
        out[name.removesuffix(".__init__")] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (``lmforge.data.shards.read_index`` ->
    ``lmforge.data.shards``)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph(package: Path = PACKAGE, top_level_only: bool = True) -> dict[str, set[str]]:
    """module -> the package modules it imports (an import of ``a.b.c`` is an edge to ``a.b.c`` only: a
    package importing its own submodules is not a cycle, a parent's ``__init__`` runs first)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        module = m + ".__init__" if path.name == "__init__.py" else m
        for _, name in _imports(path, module, top_level_only):
            target = _resolve(name, modules)
            if target is not None and target != m:
                graph[m].add(target)
    return graph


def package_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """package part -> the package parts it imports, every import counted (lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for m, targets in import_graph(package, top_level_only=False).items():
        me = _part(m)
        graph.setdefault(me, set()).update(p for t in targets if (p := _part(t)) != me)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _show(component: list[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return "  " + ", ".join(edges)


# ---- the checks -------------------------------------------------------------------------------------
def test_layers_are_one_way():
    files = list(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    bad = violations()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_module_level_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100  # the graph holds the package's imports
    found = cycles(graph)
    assert not found, "modules that import each other at import time:\n" + "\n".join(
        _show(c, graph) for c in found)


def test_no_cycles_between_packages():
    graph = package_graph()
    assert {"tokenizer", "data", "models", "train", "cli"} <= set(graph) and graph["data"] >= {"tokenizer"}
    found = cycles(graph)
    assert not found, "packages that import each other:\n" + "\n".join(_show(c, graph) for c in found)


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
    assert [m for _, m in _imports(probe, "lmforge.eval.probe", top_level_only=True)] == [
        "os", "lmforge.models.lora"]
    bad = file_violations(probe, "lmforge.eval.probe")
    assert len(bad) == 2
    assert ":4: eval (layer 3) imports lmforge.tasks.run (layer 4)" in bad[0]
    assert ":6: eval (layer 3) imports lmforge.train.trainer" in bad[1]  # a forbidden sibling
    assert file_violations(probe, "lmforge.tasks.probe") == []  # tasks may use train and models
    assert "no layer" in file_violations(probe, "lmforge.newpkg.probe")[0]
    # the CLI is the top layer: it may import anything, nothing below may import it
    assert file_violations(probe, "lmforge.cli.probe") == []
    below = tmp_path / "below.py"
    below.write_text("from lmforge.cli.pretrain import run\n", encoding="utf-8")
    assert "train (layer 3) imports lmforge.cli.pretrain (layer 5)" in file_violations(below, "lmforge.train.x")[0]


def test_a_computed_import_name_fails_outside_the_cli(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n"
                     "from importlib import import_module\n"
                     "NAMES = {'a': 'lmforge.train.trainer'}\n"
                     "def f(name):\n"
                     "    importlib.import_module(NAMES[name])\n"
                     "    import_module(f'lmforge.{name}')\n"
                     "    return __import__(name)\n"
                     "def g():\n"
                     "    return __import__('lmforge').__version__, import_module('lmforge.config')\n",
                     encoding="utf-8")
    assert dynamic_imports(probe) == [5, 6, 7]
    bad = file_violations(probe, "lmforge.train.probe")
    assert [b.split(": ")[0].rsplit(":", 1)[1] for b in bad] == ["5", "6", "7"]
    assert all("computed name" in b for b in bad)
    assert file_violations(probe, "lmforge.cli.probe") == []  # the CLI may load its verbs lazily
    # a literal target is an import like any other: checked against the layers
    assert (9, "lmforge") in _imports(probe, "lmforge.train.probe")
    upward = tmp_path / "upward.py"
    upward.write_text("import importlib\nimportlib.import_module('lmforge.serve.app')\n", encoding="utf-8")
    assert file_violations(upward, "lmforge.train.upward") == [
        f"{upward}:2: train (layer 3) imports lmforge.serve.app (layer 4)"]


def _tree(root: Path, files: dict[str, str]) -> Path:
    """A throwaway ``lmforge`` package under ``root`` with the given modules."""
    package = root / "lmforge"
    for name, text in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent != package and not (path.parent / "__init__.py").exists():
            (path.parent / "__init__.py").write_text("", encoding="utf-8")
        path.write_text(text, encoding="utf-8")
    return package


def test_cycle_checks_catch_a_bad_tree(tmp_path):
    package = _tree(tmp_path, {
        # a -> b -> c -> a at import time (through `from … import module` and a relative import)
        "data/a.py": "from lmforge.data import b\n",
        "data/b.py": "import lmforge.data.c\n",
        "data/c.py": "from .a import x\n",
        # lazily, under TYPE_CHECKING, or a package importing its own submodule: no module-level cycle
        "data/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmforge.data.e import y\n",
        "data/e.py": "def f():\n    from lmforge.data.d import z\nfrom lmforge.data import d\n",
        "models/__init__.py": "from lmforge.models.m import m\n",
        "models/m.py": "from lmforge.config import UserError\nimport lmforge.models\n",
        # two packages of one layer that import each other, one side only lazily
        "tokenizer/t.py": "def f():\n    from lmforge.data.e import g\n",
        "data/f.py": "from lmforge.tokenizer.t import f\n",
    })
    graph = import_graph(package)
    assert graph["lmforge.data.a"] == {"lmforge.data.b"} and graph["lmforge.data.c"] == {"lmforge.data.a"}
    assert "lmforge.data.e" not in graph["lmforge.data.d"] and graph["lmforge.tokenizer.t"] == set()
    found = cycles(graph)
    assert ["lmforge.data.a", "lmforge.data.b", "lmforge.data.c"] in found
    assert ["lmforge.models", "lmforge.models.m"] in found  # __init__ and module importing each other
    assert not any("lmforge.data.d" in c or "lmforge.tokenizer.t" in c for c in found)
    assert cycles(package_graph(package)) == [["data", "tokenizer"]]
    # and the lazy side alone is still a layer violation (data is above the tokenizer)
    assert "tokenizer (layer 1) imports lmforge.data.e" in file_violations(
        package / "tokenizer" / "t.py", "lmforge.tokenizer.t")[0]
    # without the cycles nothing is reported
    clean = _tree(tmp_path / "clean", {"data/a.py": "from lmforge.data import b\n", "data/b.py": "import os\n",
                                       "tokenizer/t.py": "import lmforge.config\n"})
    assert cycles(import_graph(clean)) == [] and cycles(package_graph(clean)) == []
