"""Reading a DCP checkpoint without running it.

torch's DCP ``FileSystemReader`` unpickles ``.metadata``, and its default load planner can
``torch.load(weights_only=False)`` byte entries: a crafted checkpoint would execute code. Here the index is
unpickled by a restricted unpickler that admits only DCP's own metadata classes, every entry is checked
(tensors only, in ``__R_N.distcp`` files of the same dir, untransformed, inside each file), and a planner
refuses byte entries. `lmforge.train.checkpoint` loads through `SafeReader` and `SafeLoadPlanner`.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lmforge.config import UserError

DCP_INDEX = ".metadata"
_MAX_INDEX_BYTES = 1 << 30  # a DCP index of a 70B model with optimizer state is a few MB
_DISTCP_RE = re.compile(r"^__\d+_\d+\.distcp$")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for name in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[(metadata.__name__, name)] = getattr(metadata, name)
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    from torch import serialization

    if hasattr(serialization, "_get_layout"):  # turns 'torch.strided' into the layout object
        allowed[("torch.serialization", "_get_layout")] = serialization._get_layout
    for name in ("PosixPath", "PurePosixPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    return allowed


class _IndexUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes and torch dtypes/layouts/memory formats; nothing else."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _IndexUnpickler._allowed is None:
            _IndexUnpickler._allowed = _allowed_globals()
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


class _Refused(Exception):
    pass


def read_dcp_index(index: str | os.PathLike):
    """DCP's ``.metadata`` through the restricted unpickler, then checked: only tensor entries, stored
    in ``__R_N.distcp`` files of the same dir, untransformed, inside each file's size. UserError otherwise."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    index = Path(index)
    where = f"checkpoint index '{index}'"
    try:
        size = index.stat().st_size
    except OSError:
        raise UserError(f"{where} is missing; the checkpoint is incomplete, resume from another one") from None
    if size > _MAX_INDEX_BYTES:
        raise UserError(f"{where} is {size:,} bytes, over the {_MAX_INDEX_BYTES:,} limit; not loaded")
    try:
        with open(index, "rb") as f:
            md = _IndexUnpickler(io.BytesIO(f.read())).load()
    except _Refused as e:
        raise UserError(f"{where} refers to {e}, which a DCP index never holds; refusing to load it "
                        "(nothing was executed)") from None
    except Exception as e:  # noqa: BLE001 - truncated/garbage pickle: EOFError, UnpicklingError, ...
        raise UserError(f"{where} is truncated or corrupt ({type(e).__name__}); resume from another "
                        "checkpoint") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise UserError(f"{where} is not a DCP index; refusing to load it")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UserError(f"{where}: entry '{key}' is a pickled object ({type(entry).__name__}), not a tensor; "
                            "lmforge checkpoints hold only tensors, so it is not loaded")
    sizes: dict[str, int] = {}
    for key, item in md.storage_data.items():
        if not isinstance(item, _StorageInfo) or not isinstance(item.relative_path, str) \
                or not _DISTCP_RE.match(item.relative_path):
            raise UserError(f"{where}: storage entry {getattr(key, 'fqn', key)!r} points outside the checkpoint's "
                            "__R_N.distcp files; refusing to load it")
        if getattr(item, "transform_descriptors", None):
            raise UserError(f"{where}: storage entry {getattr(key, 'fqn', key)!r} asks for transforms "
                            f"{item.transform_descriptors!r}; lmforge writes none, so it is not loaded")
        if not (isinstance(item.offset, int) and isinstance(item.length, int)
                and item.offset >= 0 and item.length >= 0):
            raise UserError(f"{where}: storage entry {getattr(key, 'fqn', key)!r} has a bad offset/length")
        if item.relative_path not in sizes:
            shard = index.parent / item.relative_path
            sizes[item.relative_path] = shard.stat().st_size if shard.is_file() else -1
        have = sizes[item.relative_path]
        if have < item.offset + item.length:
            what = "is missing" if have < 0 else f"is {have} bytes, shorter than the index says (truncated)"
            raise UserError(f"checkpoint shard '{index.parent / item.relative_path}' {what}; "
                            "resume from another checkpoint")
    return md


class SafeReader(FileSystemReader):
    """DCP's file reader with :func:`read_dcp_index` in place of ``pickle.load``."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        name = DCP_INDEX if rank is None else f"__{rank}{DCP_INDEX}"
        md = read_dcp_index(Path(str(self.path)) / name)
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """Refuses byte entries (DCP would ``torch.load(weights_only=False)`` them)."""

    def load_bytes(self, read_item, value) -> None:
        raise UserError(f"checkpoint entry '{read_item.dest_index.fqn}' is a pickled object, not a tensor; "
                        "refusing to unpickle it")
