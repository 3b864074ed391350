"""The one metadata schema of every on-disk model artifact, and its one reader (no torch import).

A model dir's ``config.json``::

    {"model":   {the ModelConfig},
     "lmforge": {"format_version": 1, "kind": "model", "task": "lm" | "classify" | "reward",
                 "labels": [...], "pooling": "last", "max_tokens": 128,    (classifiers / reward models)
                 "heads": ["mlm", "pooler"],                                 (heads.safetensors beside it)
                 "tokenizer_hash": "sha256:…", "lmforge_version": "…"},
     "hf": {…}, "finetune": {…}, "trained_with": "…", "tokenizer_extension": {…}}    (provenance, free-form)

An adapter dir's ``adapter_config.json``::

    {"lmforge": {"format_version": 1, "kind": "adapter", "task": …, "labels": …, "pooling": …,
                 "lmforge_version": "…"},
     "base_model": "/abs/base", "base_fingerprint": "…", "rank": 8, "alpha": 16.0, "targets": [...]}

An adapter for a base with a PEFT-expressible Hugging Face family keeps that same object in
``lmforge_adapter.json`` instead, and ``adapter_config.json`` is PEFT's (`lmforge.artifacts.hf.peft_format`
owns that format), so ``peft.PeftModel.from_pretrained(hf_base, dir)`` loads the dir too.

Dirs written before the schema (format 0) kept those fields at the top level (``task``, ``labels``,
``pooling``, ``max_tokens``, ``heads``, ``tokenizer_hash``, ``lmforge_version``; a plain LM had no
``task``), and the oldest config.json held the bare ModelConfig. `read_metadata` converts every one of
those shapes, so old dirs keep loading; every save function writes the current shape through
`model_config_json` / `adapter_config_json`. Every read goes through the bounded JSON reader.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.config import UserError, from_dict, read_json_bounded
from lmforge.models.config import ModelConfig

FORMAT_VERSION = 1
BLOCK = "lmforge"  # the schema's key in config.json / adapter_config.json
CONFIG_NAME = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_META = "lmforge_adapter.json"  # beside a PEFT-format adapter_config.json (lmforge.artifacts.hf.peft_format)
TASKS = ("lm", "classify", "reward")
KINDS = ("model", "adapter")
# The fields the schema owns. Format 0 kept them at the top level of the JSON.
SCHEMA_FIELDS = ("task", "labels", "pooling", "max_tokens", "heads", "tokenizer_hash", "lmforge_version")
ADAPTER_FIELDS = ("base_model", "base_fingerprint", "rank", "alpha", "targets")


@dataclass(frozen=True)
class ArtifactInfo:
    """What a model or adapter dir is, read from its metadata (any format version)."""

    path: Path
    kind: str = "model"  # "model" | "adapter"
    task: str = "lm"  # "lm" | "classify" | "reward"
    format_version: int = FORMAT_VERSION  # as written on disk: 0 = before the schema (converted on read)
    model: dict[str, Any] = field(default_factory=dict)  # the ModelConfig fields ({} for adapters)
    labels: list[str] | None = None
    pooling: str | None = None
    max_tokens: int | None = None  # the length texts were cut to in fine-tuning (classifiers)
    heads: list[str] = field(default_factory=list)
    tokenizer_hash: str | None = None
    lmforge_version: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)  # base_model, base_fingerprint, rank, alpha, targets
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: hf, finetune, trained_with, …

    @property
    def hf(self) -> dict[str, Any]:
        """The Hugging Face record of an imported dir ({} otherwise)."""
        record = self.extra.get("hf")
        return record if isinstance(record, dict) else {}

    @property
    def max_seq_len(self) -> int | None:
        value = self.model.get("max_seq_len")
        return value if isinstance(value, int) and value > 0 else None

    def task_fields(self) -> dict[str, Any]:
        """task, labels, pooling, max_tokens (the ones that are set)."""
        out = {"task": self.task, "labels": self.labels, "pooling": self.pooling, "max_tokens": self.max_tokens}
        return {k: v for k, v in out.items() if v is not None}

    def model_config(self):
        """The `ModelConfig` of a model dir (checked field by field)."""
        if self.kind != "model":
            raise UserError(f"'{self.path}' is an adapter dir; its model config is the base model's "
                            f"('{self.adapter.get('base_model')}')")
        return from_dict(ModelConfig, self.model, prefix="model")


# ---- writing ---------------------------------------------------------------------------------------
def metadata_block(kind: str = "model", task: str = "lm", labels: list[str] | None = None,
                   pooling: str | None = None, max_tokens: int | None = None, heads: list[str] | None = None,
                   tokenizer_hash: str | None = None) -> dict[str, Any]:
    """The ``lmforge`` block every save function writes (unset fields left out)."""
    if kind not in KINDS:
        raise ValueError(f"artifact kind {kind!r} is not one of {KINDS}")
    if task not in TASKS:
        raise ValueError(f"artifact task {task!r} is not one of {TASKS}")
    block: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind, "task": task}
    if labels is not None:
        block["labels"] = [str(x) for x in labels]
    if pooling is not None:
        block["pooling"] = pooling
    if max_tokens is not None:
        block["max_tokens"] = int(max_tokens)
    if heads:
        block["heads"] = list(heads)
    if tokenizer_hash:
        block["tokenizer_hash"] = tokenizer_hash
    block["lmforge_version"] = __version__
    return block


def _split_extra(extra: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(schema fields, provenance) of a caller's ``extra`` dict: schema fields passed the old way
    (``extra={"tokenizer_hash": …, "max_tokens": …}``) land in the block, not at the top level."""
    extra = dict(extra or {})
    extra.pop(BLOCK, None)
    fields = {k: extra.pop(k) for k in SCHEMA_FIELDS if k in extra}
    fields.pop("lmforge_version", None)  # always this lmforge's
    return {k: v for k, v in fields.items() if v is not None}, extra


def model_config_json(model: dict[str, Any], task: str = "lm", extra: dict[str, Any] | None = None,
                      **fields: Any) -> dict[str, Any]:
    """The ``config.json`` of a model dir: the model config, the ``lmforge`` block, then provenance."""
    from_extra, provenance = _split_extra(extra)
    provenance.pop("model", None)
    merged = {**from_extra, **{k: v for k, v in fields.items() if v is not None}}
    merged["task"] = task  # what the writer saves, whatever ``extra`` says
    if merged.get("heads") is not None:
        merged["heads"] = list(merged["heads"])
    block = metadata_block("model", **merged)
    return {"model": model, BLOCK: block, **provenance}


def adapter_config_json(base_model: str, base_fingerprint: str, rank: int, alpha: float, targets: list[str],
                        task: str = "lm", labels: list[str] | None = None, pooling: str | None = None
                        ) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA adapter dir."""
    return {BLOCK: metadata_block("adapter", task, labels=labels, pooling=pooling),
            "base_model": str(base_model), "base_fingerprint": base_fingerprint, "rank": int(rank),
            "alpha": alpha, "targets": list(targets)}


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    Path(path).write_text(dumps(data), encoding="utf-8")


# ---- reading ---------------------------------------------------------------------------------------
def read_raw(path: str | os.PathLike, what: str = "model config") -> dict[str, Any]:
    """A metadata JSON object through the bounded reader (size and depth capped, one-line errors)."""
    data = read_json_bounded(path, what=what)
    if not isinstance(data, dict):
        raise UserError(f"{what} '{path}' is not a JSON object; re-export the dir")
    return data


def normalize(data: dict[str, Any], path: Path, kind: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(schema block, rest, format version on disk) of a config.json / adapter_config.json in any format."""
    block = data.get(BLOCK)
    if isinstance(block, dict) and "format_version" in block:
        version = block["format_version"]
        if not isinstance(version, int) or version < 1:
            raise UserError(f"'{path}' has an invalid {BLOCK}.format_version {version!r}; re-export the dir")
        if version > FORMAT_VERSION:
            raise UserError(f"'{path}' was written by a newer lmforge (format {version}, this one reads up to "
                            f"{FORMAT_VERSION}); upgrade lmforge to load it")
        rest = {k: v for k, v in data.items() if k != BLOCK}
        return dict(block), rest, version
    # format 0: the schema fields sat at the top level; a plain LM had no task
    block = {k: data[k] for k in SCHEMA_FIELDS if k in data}
    rest = {k: v for k, v in data.items() if k not in SCHEMA_FIELDS}
    if kind == "model" and "model" not in rest:
        if "model_type" in rest:
            raise UserError(f"'{path.parent}' is a Hugging Face model dir, not an lmforge one; run "
                            f"`lmforge import --hf {path.parent} --out DIR` first")
        rest = {"model": rest}  # the oldest shape: config.json held the bare ModelConfig
    block.setdefault("task", "lm")
    block["kind"] = kind
    return block, rest, 0


def _info(directory: Path, path: Path, kind: str) -> ArtifactInfo:
    block, rest, version = normalize(read_raw(path, "adapter config" if kind == "adapter" else "model config"),
                                     path, kind)
    task = block.get("task") or "lm"
    if task not in TASKS:
        raise UserError(f"'{path}' names an unknown task {task!r} (known: {', '.join(TASKS)}); it was written "
                        "by another tool or a newer lmforge")
    labels = block.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise UserError(f"'{path}': labels must be a list of strings; re-export the dir")
    if task == "classify" and not labels:
        raise UserError(f"'{path}' is a classifier without labels; re-export the classifier dir")
    heads = block.get("heads") or []
    if not isinstance(heads, list) or not all(isinstance(x, str) for x in heads):
        raise UserError(f"'{path}': heads must be a list of names; re-export the dir")
    max_tokens = block.get("max_tokens")
    token_hash = block.get("tokenizer_hash")
    model = rest.pop("model", None) if kind == "model" else {}
    if kind == "model" and not isinstance(model, dict):
        raise UserError(f"'{path}' does not hold a model config (a JSON object with a 'model' section); "
                        "re-export the model dir")
    adapter = {k: rest.pop(k) for k in ADAPTER_FIELDS if k in rest} if kind == "adapter" else {}
    if kind == "adapter":
        missing = [k for k in ADAPTER_FIELDS if k not in adapter]
        if missing and "peft_type" in rest:
            raise UserError(f"'{directory}' is a PEFT adapter without lmforge's {ADAPTER_META}; load it on an "
                            "imported base with lmforge.artifacts.adapter_dir.load_adapter(DIR, base=BASE_DIR)")
        if missing:
            raise UserError(f"'{path}' lacks {', '.join(missing)}; pass RUN/adapter of a finetune.mode=lora run")
    return ArtifactInfo(
        path=directory, kind=kind, task=task, format_version=version, model=model, labels=labels,
        pooling=block.get("pooling"), max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        heads=list(heads), tokenizer_hash=token_hash if isinstance(token_hash, str) and token_hash else None,
        lmforge_version=block.get("lmforge_version"), adapter=adapter, extra=rest)


def read_metadata(directory: str | os.PathLike) -> ArtifactInfo:
    """What ``directory`` is: a model dir (config.json) or a LoRA adapter dir (adapter_config.json), in
    any format version. A missing or unreadable file is a one-line error naming the dir and the fix."""
    d = Path(directory)
    if (d / CONFIG_NAME).is_file():
        return _info(d, d / CONFIG_NAME, "model")
    if (d / ADAPTER_META).is_file():  # a PEFT-format adapter dir: lmforge's fields sit beside PEFT's config
        return _info(d, d / ADAPTER_META, "adapter")
    if (d / ADAPTER_CONFIG).is_file():
        return _info(d, d / ADAPTER_CONFIG, "adapter")
    raise UserError(f"'{directory}' is not a model dir: {CONFIG_NAME} is missing "
                    "(for a Hugging Face checkpoint run `lmforge import --hf DIR --out DIR` first)")


def kind(directory: str | os.PathLike) -> str:
    """"adapter", or the task of a model dir: "lm", "classify" or "reward"."""
    info = read_metadata(directory)
    return "adapter" if info.kind == "adapter" else info.task


def is_model_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / CONFIG_NAME).is_file()


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file() or (Path(directory) / ADAPTER_META).is_file()


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """A model dir's config.json in the current shape (old formats converted): for tools that copy a dir
    and change one field (`tokenizer extend`)."""
    info = read_metadata(directory)
    if info.kind != "model":
        raise UserError(f"'{directory}' is an adapter dir; pass a model dir")
    return model_config_json(dict(info.model), info.task, extra=info.extra, labels=info.labels,
                             pooling=info.pooling, max_tokens=info.max_tokens, heads=info.heads or None,
                             tokenizer_hash=info.tokenizer_hash)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_META", "BLOCK", "CONFIG_NAME", "FORMAT_VERSION", "TASKS", "ArtifactInfo",
           "adapter_config_json", "is_adapter_dir", "is_model_dir", "kind", "metadata_block",
           "model_config_json", "normalize", "read_config_json", "read_metadata", "read_raw", "write_json"]
