"""Typed configuration: dataclasses built from YAML/dicts plus ``a.b=value`` overrides.

Every error is a :class:`ConfigError` that names the key and, where possible, the fix.
Config files are data: they are parsed with ``yaml.safe_load`` and never executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmforge.atomic import atomic_write_text
from lmforge.errors import ConfigError, UserError  # defined there (layer 0); importable from here too

T = TypeVar("T")


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow the lossless conversions YAML needs."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1 and any(dataclasses.is_dataclass(a) for a in args):
            # an optional section (`Section | None`): its own message, e.g. an unknown key inside it
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not one of {', '.join(repr(a) for a in allowed)}"
                + _suggest(str(value), [str(a) for a in allowed])
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (inner, *_) = get_args(tp) or (Any,)
        out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    A class attribute ``YAML_KEYS`` (``{"async": "async_"}``) spells a field named after a Python keyword
    as the keyword in YAML (`to_dict` writes it back so). A section may name keys of another stage's
    section in a class attribute ``OTHER_STAGE_KEYS``
    (``{key: (inert value, hint)}``): such a key holding its inert value (as older config.yaml files spell it
    out) is read and dropped; any other value is refused with ``<key> <hint>``."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    other_stage: dict[str, tuple[Any, str]] = getattr(cls, "OTHER_STAGE_KEYS", {})
    yaml_keys: dict[str, str] = getattr(cls, "YAML_KEYS", {})  # YAML spelling -> field (a Python keyword)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        name = yaml_keys.get(name, name)
        if name not in fields and name in other_stage:
            inert, hint = other_stage[name]
            if value == inert:
                continue
            raise ConfigError(f"{key} {hint}")
        if name not in fields:
            spelled = {f: k for k, f in yaml_keys.items()}
            raise ConfigError(f"unknown config key '{key}'" + _suggest(name, [spelled.get(f, f) for f in fields]))
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # a missing required field
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list/scalars (JSON and YAML safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        spelled = {f: k for k, f in getattr(obj, "YAML_KEYS", {}).items()}  # field -> its YAML key
        return {spelled.get(f.name, f.name): to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 3e-4); the value is parsed as YAML (data only)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key; write section.key=value")
    try:
        value = safe_load_yaml_text(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    # YAML 1.1 reads 3e-4 as a string; numbers users type should be numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b.c=value`` override set."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


MAX_CONFIG_BYTES = 16 << 20  # a YAML recipe is a few KB
MAX_JSON_BYTES = 256 << 20  # config.json / index.json / meta.json / results: far below this
MAX_JSON_DEPTH = 64


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: Any):
        super().__init__()
        self.problem_mark = mark
        self.problem = ("uses a YAML alias (*name); lmforge configs do not expand anchors/aliases "
                        "(a few lines can expand to gigabytes) — write the values out")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first alias, before anything is built ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event().start_mark)
        return super().compose_node(parent, index)


def safe_load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` without aliases (raises a ``yaml.YAMLError`` for one)."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return True


MAX_RECORD_CHARS = 64 << 20  # one JSON record of data (a .jsonl line, an element of a .json array)


def loads_bounded(text: str, where: str, error: type[Exception] = UserError, max_depth: int = MAX_JSON_DEPTH,
                  max_chars: int | None = MAX_RECORD_CHARS, pos: int | None = None) -> Any:
    """``json.loads(text)`` with nesting and size caps: over a cap is one ``error`` line naming ``where``
    (e.g. ``file:line``); invalid JSON still raises ``json.JSONDecodeError`` for the caller to word.

    With ``pos`` the value starting there is decoded (``JSONDecoder.raw_decode``) and ``(value, end)``
    returned. ``max_chars`` (None = no cap) bounds the decoded text; depth is walked only when the text
    holds more brackets than ``max_depth`` (a cheap count), so flat records cost nothing extra.
    """
    start = 0 if pos is None else pos
    if max_chars is not None and pos is None and len(text) > max_chars:
        raise error(f"{where}: one JSON record of {len(text):,} characters, over the {max_chars:,} limit; "
                    "split it into smaller records")
    try:
        if pos is None:
            obj, end = json.loads(text), len(text)
        else:
            obj, end = _DECODER.raw_decode(text, pos)
    except RecursionError:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels; data records are not nested that "
                    "deep — fix or remove it") from None
    if max_chars is not None and end - start > max_chars:
        raise error(f"{where}: one JSON record of {end - start:,} characters, over the {max_chars:,} limit; "
                    "split it into smaller records")
    if text.count("[", start, end) + text.count("{", start, end) > max_depth and not _depth_ok(obj, max_depth):
        raise error(f"{where}: JSON nested deeper than {max_depth} levels; data records are not nested that "
                    "deep — fix or remove it")
    return obj if pos is None else (obj, end)


_DECODER = json.JSONDecoder()


def read_json_bounded(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES,
                      max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a JSON file with size and nesting caps; every failure is a one-line UserError naming ``what``."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise UserError(f"{what} '{path}' is {size:,} bytes, over the {max_bytes:,}-byte limit; "
                            "it is not an lmforge file")
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror or e})") from None
    except RecursionError:
        raise UserError(f"{what} '{path}' is nested too deeply (over {max_depth} levels); it is not an "
                        "lmforge file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} '{path}' is not valid JSON ({str(e).splitlines()[0][:120]}); restore or "
                        "regenerate it") from None
    if not _depth_ok(data, max_depth):
        raise UserError(f"{what} '{path}' is nested deeper than {max_depth} levels; it is not an lmforge file")
    return data


def _parse_yaml_mapping(text: str, what: str) -> dict[str, Any]:
    """The YAML mapping in ``text`` (safe loader, no aliases); ``what`` names the source in errors."""
    try:
        data = safe_load_yaml_text(text)
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply; pass a YAML recipe") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (safe loader, no aliases, size-capped); a clear error for a bad file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{path}' is larger than {MAX_CONFIG_BYTES >> 20} MB; a recipe is a few KB")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{path}' is not UTF-8 text; pass a YAML file") from None
    return _parse_yaml_mapping(text, f"config file '{path}'")


# ---- recipes: the YAML files shipped in the package (lmforge/recipes/; `configs/` in a checkout links there) ----

RECIPE_PREFIX = "recipe:"
# spellings of the recipe folder in a source checkout, accepted before a recipe name when no such file exists
# (so `--config configs/pretrain/tiny.yaml` from the docs also runs from an installed wheel)
_RECIPE_DIRS = ("configs/", "lmforge/recipes/")


def _recipes_root() -> Any:
    return importlib.resources.files("lmforge") / "recipes"


def recipe_names() -> list[str]:
    """The packaged recipes by name, e.g. ``['finetune/classify', ..., 'pretrain/tiny', 'quickstart']``."""
    names: list[str] = []
    stack = [(_recipes_root(), "")]
    while stack:
        node, prefix = stack.pop()
        if not node.is_dir():
            continue
        for child in node.iterdir():
            if child.is_dir():
                stack.append((child, f"{prefix}{child.name}/"))
            elif child.name.endswith(".yaml"):
                names.append(prefix + child.name[: -len(".yaml")])
    return sorted(names)


def recipe_name(arg: str | os.PathLike) -> str | None:
    """The packaged recipe ``arg`` names (``pretrain/tiny``, ``recipe:pretrain/tiny``, ``pretrain/tiny.yaml``,
    ``configs/pretrain/tiny.yaml``), or None. An existing file is a file, not a recipe, unless ``recipe:``
    says otherwise."""
    text = str(arg)
    explicit = text.startswith(RECIPE_PREFIX)
    if explicit:
        text = text[len(RECIPE_PREFIX):]
    elif Path(text).exists():
        return None
    text = text.replace("\\", "/").removesuffix(".yaml")
    names = recipe_names()
    if text in names:
        return text
    for folder in _RECIPE_DIRS:
        if not explicit and text.startswith(folder) and text[len(folder):] in names:
            return text[len(folder):]
    return None


def recipe_path(name: str) -> Any:
    """The packaged recipe file of ``name`` (an ``importlib.resources`` Traversable; ``read_text`` reads it)."""
    if name not in recipe_names():
        raise ConfigError(f"there is no packaged recipe '{name}'; available: {', '.join(recipe_names())}")
    return _recipes_root().joinpath(*f"{name}.yaml".split("/"))


def load_recipe(name: str) -> dict[str, Any]:
    """The YAML mapping of the packaged recipe ``name`` (e.g. ``pretrain/tiny``)."""
    return _parse_yaml_mapping(recipe_path(name).read_text(encoding="utf-8"), f"recipe '{name}'")


def load_config_source(arg: str | os.PathLike) -> dict[str, Any]:
    """What ``--config`` names: a YAML file, or a packaged recipe (``pretrain/tiny``, ``recipe:pretrain/tiny``);
    anything else is a one-line error that lists the recipes."""
    name = recipe_name(arg)
    if name is not None:
        return load_recipe(name)
    text = str(arg)
    if text.startswith(RECIPE_PREFIX) or not Path(text).exists():
        raise ConfigError(f"config '{text}' does not exist as a YAML file and is not a packaged recipe; "
                          "pass an existing file or one of: " + ", ".join(recipe_names()))
    return load_yaml(arg)


def dump_yaml(data: Any, path: str | os.PathLike) -> None:
    """Atomic YAML write (temp file + rename)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(data), sort_keys=False, allow_unicode=True))


def config_hash(data: Any) -> str:
    """Stable short hash of a config (dataclass or dict)."""
    blob = json.dumps(to_dict(data), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
