"""The Python in the README and the docs names modules and names that exist: every `from lmforge… import …`
and `import lmforge…` in a ```python block resolves (the module imports, each name is an attribute of it), and
every `lmforge.x.y` / `lmforge/x/y.py` path written in the prose names a module or package that exists. When
code moves, these fail until the docs follow."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
DOTTED = re.compile(r"`(lmforge(?:\.[a-z_][a-z0-9_]*)+)")
PATH = re.compile(r"`(lmforge(?:/[a-z_][a-z0-9_]*)+(?:\.py|/))")


def lmforge_imports(code: str) -> list[tuple[str, list[str]]]:
    """(module, [names]) of every lmforge import in ``code`` (names empty for ``import lmforge.x``)."""
    out = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmforge") and not node.level:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("lmforge")]
    return out


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, m in enumerate(FENCE.finditer(page.read_text(encoding="utf-8"))):
            found.append((f"{page.relative_to(ROOT)}#{i}", m.group(1)))
    return found


def unresolved(module: str, names: list[str]) -> list[str]:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return [f"{module}: {e}"]
    return [f"{module}.{n}" for n in names if n != "*" and not hasattr(mod, n)]


def resolves_as_module_or_attribute(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):  # the longest importable prefix, the rest attributes of it
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("where,code", snippets(), ids=[w for w, _ in snippets()])
def test_python_snippets_import_what_exists(where, code):
    bad = [u for module, names in lmforge_imports(code) for u in unresolved(module, names)]
    assert not bad, f"{where}: the docs import names that do not exist: {bad}"


def test_module_paths_named_in_the_docs_exist():
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for dotted in set(DOTTED.findall(text)):
            if not resolves_as_module_or_attribute(dotted):
                bad.append(f"{page.relative_to(ROOT)}: `{dotted}`")
        for path in set(PATH.findall(text)):
            if not (ROOT / path).exists():
                bad.append(f"{page.relative_to(ROOT)}: `{path}`")
    assert not bad, "the docs name modules that do not exist:\n" + "\n".join(sorted(bad))


def test_the_checks_catch_a_moved_name():
    code = "from lmforge.config import ConfigError\nfrom lmforge.finetune.recipes import finetune\nimport lmforge.nope\n"
    bad = [u for module, names in lmforge_imports(code) for u in unresolved(module, names)]
    assert len(bad) == 2 and "lmforge.finetune.recipes" in bad[0] and "lmforge.nope" in bad[1]
    assert unresolved("lmforge.config", ["ConfigError", "NoSuchName"]) == ["lmforge.config.NoSuchName"]
    assert resolves_as_module_or_attribute("lmforge.config.ConfigError")
    assert not resolves_as_module_or_attribute("lmforge.models.model_dir")
