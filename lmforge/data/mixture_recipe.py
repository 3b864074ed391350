"""`lmforge prepare --mixture RECIPE.yaml`: add (or update, by name) a prepared shard dir as a source of a
pretraining recipe's ``data.sources``.

A missing (or empty) recipe is created from a minimal pretraining config (the ``tiny`` preset, ``seq_len``,
a step budget); an existing one keeps every other key and its leading comment lines. The new file is
checked by the caller's ``validate`` (the pretraining config loader; this module sits in the data layer and
must not import it) before it atomically replaces the old one, under the one-writer lock ``.RECIPE.lock``
beside it; a second prepare writing the same recipe waits for the lock, so both sources land.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmforge.atomic import atomic_write_text
from lmforge.config import ConfigError, UserError, load_yaml
from lmforge.console import info
from lmforge.data.shards import read_index
from lmforge.lock import Locked, acquire, output_lock_path

LOCK_WAIT_S = 120.0  # another prepare holds the recipe only while it rewrites it (well under a second)

_HEADER = """\
# Data mixture written by `lmforge prepare --mixture`: each prepare adds (or updates, by name) its --out
# as a source; a source's weight defaults to its train tokens, so this file mixes by size until you edit it.
# model.preset: tiny is a CPU smoke-test size; pick yours from `lmforge model list` (e.g. small, llama2-7b)
# and set train.max_steps (or max_tokens) and data.seq_len for the real run.
#   lmforge plan --model {recipe}        # tokens per source for the budget
#   lmforge pretrain --config {recipe}
"""


def new_recipe() -> dict[str, Any]:
    """The minimal valid pretraining config a new recipe starts from (data.sources filled in by the caller)."""
    return {"model": {"preset": "tiny"},
            "data": {"seq_len": 128, "sources": []},
            "train": {"global_batch": 16, "micro_batch": 16, "max_steps": 1000},
            "eval": {"interval": 100, "batches": 4}}


def _fail(recipe: str | os.PathLike, message: str) -> ConfigError:
    return ConfigError(f"--mixture '{recipe}': {message}")


def read_recipe(recipe: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """(the recipe's mapping, its leading comment lines); ({}, '') for a missing or empty file."""
    p = Path(recipe)
    if not p.exists():
        return {}, ""
    if p.is_dir():
        raise _fail(recipe, "is a directory; pass a YAML file path (e.g. mix.yaml)")
    try:
        data = load_yaml(p)
    except ConfigError as e:
        raise _fail(recipe, f"{e}; fix it or choose another --mixture file") from None
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    header = ""
    for line in lines:
        if not line.lstrip().startswith("#"):
            break
        header += line
    return data, header


def _sources(data: dict[str, Any], recipe: str | os.PathLike) -> list[Any]:
    section = data.get("data")
    if section is None:
        return []
    if not isinstance(section, dict):
        raise _fail(recipe, f"data must be a mapping of keys, got {type(section).__name__}; fix the file")
    if section.get("dir"):
        raise _fail(recipe, f"sets data.dir ({section['dir']}); a mixture lists data.sources instead: move it into "
                            "data.sources or choose another --mixture file")
    sources = section.get("sources")
    if sources is None:
        return []
    if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
        raise _fail(recipe, "data.sources must be a list of {name, dir, weight} mappings; fix the file")
    return sources


def with_source(data: dict[str, Any], recipe: str | os.PathLike, *, name: str, dir: str, weight: float,
                on_exhaust: str | None) -> tuple[dict[str, Any], bool]:
    """A copy of ``data`` (a new recipe when it is empty) with source ``name`` added or updated:
    (the new mapping, whether a source of that name was there)."""
    doc = copy.deepcopy(data) if data else new_recipe()
    sources = _sources(doc, recipe)
    doc.setdefault("data", {})
    if doc["data"] is None:
        doc["data"] = {}
    doc["data"]["sources"] = sources
    entry = {"name": name, "dir": dir, "weight": int(weight) if float(weight).is_integer() else weight}
    for s in sources:
        if s.get("name") == name:
            s.update(entry)
            if on_exhaust is not None:
                s["on_exhaust"] = on_exhaust
            return doc, True
    sources.append({**entry, "on_exhaust": on_exhaust or "repeat"})
    return doc, False


def check_tokenizer(data: dict[str, Any], recipe: str | os.PathLike, name: str, dir: str,
                    tokenizer_hash: str | None) -> None:
    """Every other source of the recipe that can be read was prepared with ``tokenizer_hash``; a source
    whose index.json cannot be read (not prepared yet) is noted and left for `pretrain` to check."""
    for s in _sources(data, recipe):
        if s.get("name") == name or not s.get("dir"):
            continue
        try:
            other = read_index(str(s["dir"])).get("tokenizer_hash")
        except (UserError, OSError) as e:
            info(f"note: --mixture '{recipe}': source '{s.get('name')}' not checked ({e})")
            continue
        if other != tokenizer_hash:
            raise _fail(recipe, f"source '{s.get('name')}' ({s['dir']}) was prepared with tokenizer {other} but "
                                f"'{name}' ({dir}) with {tokenizer_hash}; prepare every source with the same "
                                "--tokenizer, or choose another --mixture file")


def _checked(doc: dict[str, Any], recipe: str | os.PathLike, name: str,
             validate: Callable[[dict[str, Any]], Any]) -> None:
    try:
        validate(doc)
    except UserError as e:
        raise _fail(recipe, f"with source '{name}' it is not a valid pretraining recipe: {e}; fix the file "
                            "or choose another --mixture file") from None


def preflight(recipe: str | os.PathLike, *, name: str, dir: str, on_exhaust: str | None,
              tokenizer_hash: str | None, validate: Callable[[dict[str, Any]], Any]) -> None:
    """Before the (long) prepare: the recipe can be read, its sources share ``tokenizer_hash`` and, with this
    source added, it is valid."""
    data, _ = read_recipe(recipe)
    check_tokenizer(data, recipe, name, dir, tokenizer_hash)
    doc, _ = with_source(data, recipe, name=name, dir=dir, weight=1.0, on_exhaust=on_exhaust)
    _checked(doc, recipe, name, validate)


def add_source(recipe: str | os.PathLike, *, name: str, dir: str, weight: float, on_exhaust: str | None,
               tokenizer_hash: str | None, validate: Callable[[dict[str, Any]], Any],
               command: str = "lmforge prepare", wait_s: float = LOCK_WAIT_S) -> dict[str, Any]:
    """Add (or update) source ``name`` in ``recipe`` under its lock; returns what was written."""
    where = f"--mixture '{recipe}'"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lock = acquire(output_lock_path(recipe), command, where, "choose another --mixture file")
            break
        except Locked:
            if time.monotonic() >= deadline:
                raise
    try:
        data, header = read_recipe(recipe)
        check_tokenizer(data, recipe, name, dir, tokenizer_hash)
        doc, updated = with_source(data, recipe, name=name, dir=dir, weight=weight, on_exhaust=on_exhaust)
        _checked(doc, recipe, name, validate)
        if not data:
            header = _HEADER.format(recipe=recipe)
        atomic_write_text(recipe, header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    finally:
        lock.release()
    return {"recipe": str(recipe), "source": name, "dir": dir, "weight": weight, "updated": updated,
            "created": not data, "sources": [s.get("name") for s in doc["data"]["sources"]]}


__all__ = ["add_source", "check_tokenizer", "new_recipe", "preflight", "read_recipe", "with_source"]
