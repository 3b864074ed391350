"""The README stays short and every relative link in README.md and docs/ points to a file that exists.

(`mkdocs build --strict`, run by `make test`, checks the built site as well: anchors, navigation, the
generated reference pages. This test needs no MkDocs and also covers README.md, which the site does not.)
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 320

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _generated_pages() -> set[Path]:
    """Pages docs/hooks/reference.py adds to the site at build time (they exist only in the built site)."""
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs" / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports nothing from lmforge at module level
    return {(ROOT / "docs" / page).resolve() for page in module.GENERATED_PAGES}


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of each relative link or image outside code blocks and code spans."""
    found, in_fence = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
                continue  # http:, mailto:, an anchor on the same page
            found.append((number, target))
    return found


def broken_links(path: Path, generated: set[Path]) -> list[str]:
    broken = []
    for number, target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        resolved = (path.parent / file_part).resolve()
        if not resolved.exists() and resolved not in generated:
            broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    return broken


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}); move the "
                                       "detail into a page under docs/ and link it")


def test_every_relative_link_points_to_a_file():
    docs = _documents()
    assert len(docs) > 10  # README.md plus the site's pages: a glob that found nothing would pass vacuously
    assert sum(len(relative_links(p.read_text(encoding="utf-8"))) for p in docs) > 50
    generated = _generated_pages()
    broken = [b for path in docs for b in broken_links(path, generated)]
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_checker_finds_a_broken_link(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a) ![img](missing.png)\n`[not a link](nowhere.md)`\n```\n[code](nope.md)\n```\n"
                    "[web](https://example.com) [anchor](#here) [gone](sub/gone.md)\n")
    assert broken_links(page, set()) == ["page.md:1: missing.png", "page.md:6: sub/gone.md"]
    assert broken_links(page, {(tmp_path / "sub" / "gone.md").resolve()}) == ["page.md:1: missing.png"]
