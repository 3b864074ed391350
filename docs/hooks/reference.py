"""MkDocs hook: the config key reference and the CLI reference, generated from the code at build time.

Both pages are built from what lmforge itself uses -- the config dataclasses (``dataclasses.fields``,
walked recursively, with each field's type, default and the comment on its line) and the argparse
parser of the ``lmforge`` command (``lmforge.cli.build_parser()``, every subcommand and action) -- so
the documentation cannot drift from the code. Nothing is written to ``docs/``: the pages exist only in
the built site.

When a module moves, update the tables below. A config class or the CLI that cannot be imported fails
the build with the entry to fix; it is never skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import os
import re
import tokenize
import typing
from typing import Any

# (section title, import path, class, what it configures, the prefix of its keys). Sections nested in a
# class (a dataclass-typed field: `train`, `parallel`, `log.mlflow` ...) are found by walking its fields.
CONFIG_SECTIONS: list[tuple[str, str, str, str, str]] = [
    ("Pretraining", "lmforge.train.config", "PretrainConfig",
     "`lmforge pretrain --config FILE` (and the quickstart's recipe)", ""),
    ("Fine-tuning", "lmforge.tasks.config", "FinetuneConfig",
     "`lmforge finetune --config FILE` (every `finetune.mode`: sft, lora, classify, dpo, reward, grpo)", ""),
    ("Model", "lmforge.models.config", "ModelConfig",
     ("the `model:` section of a pretraining config (any of these keys after `preset:`, which fills the rest) "
      "and the `config.json` of a model dir"), "model."),
]

# (import path, the function returning the top-level argparse parser)
CLI_PARSER: tuple[str, str] = ("lmforge.cli", "build_parser")

# Pages this hook adds to the site (relative to docs/); tests/unit/test_docs_links.py reads this list.
GENERATED_PAGES = ("reference/config.md", "reference/cli.md")


class ReferenceError(RuntimeError):
    """The reference cannot be generated: a module moved or a class was renamed."""


def _import(module: str, name: str, where: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # any failure must stop the build, naming the entry to fix
        raise ReferenceError(f"docs/hooks/reference.py: cannot import {module} for {where} ({type(e).__name__}: "
                             f"{e}); update {where} at the top of docs/hooks/reference.py") from e
    try:
        return getattr(mod, name)
    except AttributeError:
        raise ReferenceError(f"docs/hooks/reference.py: {module} has no {name} (named in {where}); update "
                             "the entry at the top of docs/hooks/reference.py") from None


# ---- config dataclasses ---------------------------------------------------------------------------------

_YAML_NAME = re.compile(r"written `(\w+):` in YAML")


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment text the class's source gives it: a comment on the field's own line,
    comment lines right above it (a block heading a group of fields), and a comment line continuing a
    comment that ends in a comma."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, list[str]] = {}
    pending: list[str] = []  # comment-only lines waiting for the next field
    last_field: str | None = None
    line_comment: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    field_line = re.compile(r"^\s+(\w+)\s*:\s*[^=]")
    for no, line in enumerate(source.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            pending, last_field = [], None
            continue
        if stripped.startswith("#"):
            text = line_comment.get(no, stripped.lstrip("#").strip())
            if last_field and comments.get(last_field) and comments[last_field][-1].endswith(","):
                comments[last_field].append(text)
            else:
                pending.append(text)
            continue
        m = field_line.match(line)
        if m and not stripped.startswith(("def ", "class ", "@", "return", "if ", "for ")) and line.startswith("    ") \
                and not line.startswith("        "):
            name = m.group(1)
            own = [line_comment[no]] if no in line_comment else []
            comments[name] = ["; ".join(pending) + (" —" if own else "")] + own if pending else own
            pending, last_field = [], name
        else:
            pending, last_field = [], None
    return {k: " ".join(v) for k, v in comments.items() if v}


def _comments_for(cls: type) -> dict[str, str]:
    """Comments of a class's fields, inherited ones from the class that declares them."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            merged.update(_field_comments(klass))
    return merged


def _type_text(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else f'"{a}"' for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_text(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if value is True or value is False:
        return str(value).lower()
    if dataclasses.is_dataclass(value):
        return "(section)"
    if isinstance(value, str):
        return f'"{value}"' if value else '""'
    return repr(value)


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass a field holds (``X``, ``X | None``), or None."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp) or ():
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and outside `code` spans `<` escaped so that text such as
    `<ModelConfig field>` is not taken for an HTML tag."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;")
    return "`".join(parts).replace("|", "\\|")


def _yaml_key(name: str, comment: str) -> str:
    m = _YAML_NAME.search(comment)
    if m:
        return m.group(1)
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _render_dataclass(cls: type, instance: Any, prefix: str, out: list[str], level: int) -> None:
    hints = typing.get_type_hints(cls)
    comments = _comments_for(cls)
    doc = inspect.getdoc(cls) or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses' generated signature is no doc
        out.append(doc.replace("``", "`") + "\n")
    rows: list[str] = []
    nested: list[tuple[str, type, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        comment = comments.get(f.name, "")
        key = _yaml_key(f.name, comment)
        tp = hints.get(f.name, f.type)
        value = getattr(instance, f.name) if instance is not None else None
        if f.default is None and value is not None and not dataclasses.is_dataclass(value):
            value = None  # declared null, derived when the config is built (e.g. model.head_dim = dim // n_heads)
        sub = _nested_dataclass(tp)
        if sub is not None:
            nested.append((key, sub, value if dataclasses.is_dataclass(value) else None))
            if value is None:  # an optional section: off unless given
                rows.append(f"| `{prefix}{key}` | {_cell(_type_text(tp))} | null (off) | "
                            f"{_cell(comment)} (keys below) |")
            continue
        rows.append(f"| `{prefix}{key}` | {_cell(_type_text(tp))} | `{_cell(_default_text(value))}` | {_cell(comment)} |")
    if rows:
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out.extend(rows)
        out.append("")
    for key, sub, value in nested:
        out.append(f"{'#' * min(level + 1, 6)} `{prefix}{key}`\n")
        if value is None:
            try:
                value = sub()
            except TypeError:
                value = None
        _render_dataclass(sub, value, f"{prefix}{key}.", out, level + 1)


def config_reference() -> str:
    out = [
        "# Config key reference",
        "",
        ("Generated from the config dataclasses when the site is built (`docs/hooks/reference.py`), so every "
         "key, type and default here is the one the code reads. Any key can be set in the YAML file or on the "
         "command line as `section.key=value`; an unknown key or a wrong type stops the command with one "
         "`error:` line naming the key."),
        "",
    ]
    for title, module, name, what, prefix in CONFIG_SECTIONS:
        cls = _import(module, name, f"CONFIG_SECTIONS entry {title!r}")
        if not dataclasses.is_dataclass(cls):
            raise ReferenceError(f"docs/hooks/reference.py: {module}.{name} (CONFIG_SECTIONS {title!r}) is not a "
                                 "dataclass")
        try:
            instance = cls()
        except TypeError as e:
            raise ReferenceError(f"docs/hooks/reference.py: {module}.{name}() needs arguments ({e}); the reference "
                                 "shows the defaults of a config built with none") from e
        out.append(f"## {title}\n")
        out.append(f"`{module}.{name}`: {what}.\n")
        _render_dataclass(cls, instance, prefix, out, level=2)
    return "\n".join(out) + "\n"


# ---- CLI ------------------------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, sub, helps.get(name, "")))
    return found


def _action_row(action: argparse.Action) -> str | None:
    if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
        return None
    if action.option_strings:
        names = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (action.dest.upper() if not action.choices else None)
            if action.choices:
                metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
            if isinstance(metavar, tuple):
                metavar = " ".join(metavar)
            nargs = {"?": f"[{metavar}]", "*": f"[{metavar} ...]", "+": f"{metavar} [...]"}.get(action.nargs, metavar)
            names += f" `{nargs}`"
    else:
        names = f"`{action.metavar or action.dest}`"
        if action.nargs in ("*", "+", "?"):
            names += f" ({action.nargs})"
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.nargs == 0 and default is False:
        default_text = ""
    else:
        default_text = f"`{_default_text(default)}`"
    required = " (required)" if getattr(action, "required", False) and action.option_strings else ""
    text = (action.help or "") % {"default": action.default, "prog": "", "dest": action.dest} \
        if action.help and "%(" in action.help else (action.help or "")
    return f"| {names}{required} | {_cell(default_text)} | {_cell(text)} |"


def _render_parser(path: str, parser: argparse.ArgumentParser, help_text: str, out: list[str], level: int) -> None:
    out.append(f"{'#' * min(level, 6)} `{path}`\n")
    description = parser.description or help_text
    if description:
        out.append(description.strip() + "\n")
    usage = parser.format_usage().strip()
    out.append(f"```text\n{usage}\n```\n")
    rows = [r for r in (_action_row(a) for a in parser._actions) if r]
    if rows:
        out.append("| argument | default | meaning |\n|---|---|---|")
        out.extend(rows)
        out.append("")
    if parser.epilog:
        out.append(parser.epilog.strip() + "\n")
    for name, sub, sub_help in _subparsers(parser):
        _render_parser(f"{path} {name}", sub, sub_help, out, level + 1)


def cli_reference() -> str:
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage to the terminal's width: the same page on every machine
    try:
        return _cli_reference()
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def _cli_reference() -> str:
    module, func = CLI_PARSER
    build = _import(module, func, "CLI_PARSER")
    parser = build()
    subs = _subparsers(parser)
    if not subs:
        raise ReferenceError(f"docs/hooks/reference.py: {module}.{func}() has no subcommands")
    commands = getattr(importlib.import_module(module), "COMMANDS", None)
    if isinstance(commands, dict):  # a stage the parser skipped because its module failed to import
        missing = sorted(set(commands) - {name for name, _, _ in subs})
        if missing:
            raise ReferenceError(f"docs/hooks/reference.py: `lmforge {missing[0]}` is in {module}.COMMANDS but "
                                 "not in the parser (its module did not import)")
    out = [
        "# CLI reference",
        "",
        ("Generated from `lmforge`'s argument parser when the site is built (`docs/hooks/reference.py`): every "
         "subcommand, argument and default below is the one the code accepts. `lmforge COMMAND --help` prints "
         "the same. Errors a user can fix print one `error:` line and exit 2."),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    out += [f"| [`lmforge {name}`](#lmforge-{name}) | {_cell(help_text)} |" for name, _, help_text in subs]
    out.append("")
    for name, sub, help_text in subs:
        _render_parser(f"lmforge {name}", sub, help_text, out, level=2)
    return "\n".join(out) + "\n"


GENERATORS = {"reference/config.md": config_reference, "reference/cli.md": cli_reference}
assert tuple(GENERATORS) == GENERATED_PAGES


# ---- MkDocs hook ----------------------------------------------------------------------------------------

def on_files(files, config):
    """MkDocs' hook: add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    for src_uri, generate in GENERATORS.items():
        if files.get_file_from_path(src_uri) is not None:
            raise ReferenceError(f"docs/{src_uri} exists, but that page is generated; delete the file")
        files.append(File.generated(config, src_uri, content=generate()))
    return files
