"""Token-shard dirs on object stores (``s3://``, ``gs://``, any fsspec URL): writing and streaming.

Writing (``prepare --out s3://bucket/prefix``): the dir is built locally, then uploaded shard by shard
with ``index.json`` last. Object stores have no directory rename, so *index.json is the commit mark*:
readers refuse a prefix without it, an overwrite deletes the old index first (the prefix reads as
incomplete until the new one lands), and files the new index does not list are removed after it.

Reading (``data.dir: s3://bucket/prefix``): :class:`RemoteShards` reads ``index.json`` and fetches each
shard into a local cache the first time a batch needs it (``data.cache_dir``, default
``$LMFORGE_CACHE_DIR`` or ``~/.cache/lmforge/shards``), checking its sha256 before it is used; the
cache is keyed by URL and index content, so a re-prepared prefix never mixes with an old copy and a
resumed run reuses what is already there. The windows read depend only on the loader state, never on
what is cached, so a resumed run reads the same windows.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_text
from lmforge.config import UserError, loads_bounded

INDEX_NAME = "index.json"
INDEX_LIMIT = 64 << 20  # bytes: an index.json bigger than this is not one
FETCH_THREADS = 8


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a local file, read in ``chunk``-byte blocks (a shard, local or just fetched)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_remote(path: str | os.PathLike | None) -> bool:
    """True for ``scheme://…`` URLs other than ``file://``."""
    text = str(path or "")
    return "://" in text and not text.startswith("file://")


def url_fs(url: str):
    """(filesystem, path inside it) for ``url``; a missing backend is a one-line error naming the package."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise UserError(f"'{url}' needs an fsspec backend that is not installed ({e}); "
                        "pip install 'lmforge[cloud]' (s3fs, gcsfs)") from None
    except ValueError as e:
        raise UserError(f"'{url}' is not a usable URL: {e}") from None


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _storage_error(url: str, e: BaseException) -> UserError:
    return UserError(f"'{url}' cannot be reached: {type(e).__name__}: {e}; check the bucket, the credentials "
                     "and the endpoint (AWS_ENDPOINT_URL for S3-compatible stores)")


def _listing(fs, root: str) -> dict[str, int]:
    """{path: size} of every object under ``root`` (fresh: no cached listing)."""
    fs.invalidate_cache(root)
    try:
        if not fs.exists(root):
            return {}
        return {p: int(info.get("size") or 0) for p, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        return {}


# --- writing ---------------------------------------------------------------------------------------------
def guard_remote_out(url: str, inputs: list[str], overwrite: bool, flag: str = "--out") -> None:
    """Before any work: refuse an ``url`` that is (or holds, or lies inside) an input URL, or that holds
    objects already (unless ``overwrite``)."""
    target = url.rstrip("/")
    for given in inputs:
        g = str(given).rstrip("/")
        if is_remote(g) and (g == target or g.startswith(target + "/") or target.startswith(g + "/")):
            raise UserError(f"{flag} '{url}' overlaps the input '{given}'; choose another {flag}")
    fs, root = url_fs(url)
    try:
        existing = _listing(fs, root)
    except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
        raise _storage_error(url, e) from None
    if existing and not overwrite:
        raise UserError(f"{flag} '{url}' already holds {len(existing)} object(s); pass --overwrite to "
                        f"replace them, or choose a new {flag}")


def upload_dir(local: Path, url: str, overwrite: bool) -> list[str]:
    """Upload the finished shard dir ``local`` to ``url``, index.json last; returns the uploaded names."""
    fs, root = url_fs(url)
    try:
        existing = _listing(fs, root)
        if existing and not overwrite:
            raise UserError(f"--out '{url}' was filled by someone else during this run; nothing uploaded")
        index_path = _join(root, INDEX_NAME)
        if index_path in existing:
            fs.rm(index_path)  # from here on the old dir reads as incomplete, never as mixed
        names = sorted(p.name for p in local.iterdir() if p.is_file() and p.name != INDEX_NAME)
        for name in names:
            fs.put_file(str(local / name), _join(root, name))
        fs.put_file(str(local / INDEX_NAME), index_path)
        keep = {_join(root, n) for n in [*names, INDEX_NAME]}
        for stale in sorted(set(existing) - keep):
            fs.rm(stale)
        fs.invalidate_cache(root)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
        raise _storage_error(url, e) from None
    return [*names, INDEX_NAME]


# --- reading ---------------------------------------------------------------------------------------------
def read_remote_index_bytes(url: str) -> bytes:
    fs, root = url_fs(url)
    path = _join(root, INDEX_NAME)
    try:
        fs.invalidate_cache(root)
        size = fs.size(path)
        if size is not None and size > INDEX_LIMIT:
            raise UserError(f"'{url}/{INDEX_NAME}' is {size:,} bytes, too big for a token-shard index")
        return fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(f"'{url}' is not a token-shard dir ({INDEX_NAME} is missing: not prepared yet, or an "
                        f"upload did not finish); run `lmforge prepare --out {url}`") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
        raise _storage_error(url, e) from None


def parse_index_bytes(data: bytes, where: str) -> dict[str, Any]:
    try:
        return loads_bounded(data.decode("utf-8"), where, max_chars=None)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({e}); re-run `lmforge prepare`") from None


def check_remote_shards(url: str, index: dict[str, Any], split: str, verify: bool = False) -> None:
    """Each shard of ``split`` is on the store with its recorded size (and, with ``verify``, sha256 —
    streamed, nothing kept)."""
    fs, root = url_fs(url)
    try:
        sizes = _listing(fs, root)
    except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
        raise _storage_error(url, e) from None
    itemsize = 2 if index["dtype"] == "uint16" else 4
    for shard in index["splits"].get(split, {}).get("shards", []):
        path = _join(root, shard["file"])
        expected = int(shard["tokens"]) * itemsize
        if path not in sizes:
            raise UserError(f"shard {url.rstrip('/')}/{shard['file']} listed in {INDEX_NAME} is missing; "
                            "re-run `lmforge prepare`")
        if sizes[path] != expected:
            raise UserError(f"shard {url.rstrip('/')}/{shard['file']} is {sizes[path]:,} bytes, index says "
                            f"{expected:,}; re-run `lmforge prepare`")
        if verify:
            h = hashlib.sha256()
            try:
                with fs.open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
            except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
                raise _storage_error(f"{url.rstrip('/')}/{shard['file']}", e) from None
            if h.hexdigest() != shard.get("sha256"):
                raise UserError(f"shard {url.rstrip('/')}/{shard['file']} is corrupt (sha256 differs from "
                                f"{INDEX_NAME}); re-run `lmforge prepare`")


def default_cache_dir() -> Path:
    env = os.environ.get("LMFORGE_CACHE_DIR")
    return Path(env).expanduser() / "shards" if env else Path.home() / ".cache" / "lmforge" / "shards"


class RemoteShards:
    """A token-shard dir at ``url`` whose shards are fetched into ``cache_dir`` on first use."""

    def __init__(self, url: str, index: dict[str, Any], index_bytes: bytes,
                 cache_dir: str | os.PathLike | None):
        self.url = url.rstrip("/")
        self.fs, self.root = url_fs(self.url)
        self.index = index
        key = hashlib.sha256(self.url.encode() + b"\0" + index_bytes).hexdigest()[:20]
        self.dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.dir = self.dir / key
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.cache_dir '{self.dir}' cannot be created ({e}); set data.cache_dir to a "
                            "writable dir") from None

        if not (self.dir / INDEX_NAME).is_file():
            atomic_write_text(self.dir / INDEX_NAME, index_bytes.decode("utf-8"))
        self.itemsize = 2 if index["dtype"] == "uint16" else 4
        self.expected = {s["file"]: s for split in index["splits"].values() for s in split.get("shards", [])}
        self.locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.expected}
        self.downloads = 0  # shards fetched by this object (the rest came from the cache)

    def check(self, split: str) -> None:
        """Every shard of ``split`` is on the store with the size its token count implies (one listing)."""
        check_remote_shards(self.url, self.index, split)

    def _cached(self, name: str) -> bool:
        p = self.dir / name
        return p.is_file() and p.stat().st_size == int(self.expected[name]["tokens"]) * self.itemsize

    def fetch(self, name: str) -> Path:
        """The local path of shard ``name``, downloaded and checked (sha256) unless already cached."""
        path = self.dir / name
        with self.locks[name]:
            if self._cached(name):
                return path
            tmp = self.dir / f".{name}.part{os.getpid()}.{threading.get_ident()}"
            try:
                self.fs.get_file(_join(self.root, name), str(tmp))

                digest = sha256_file(tmp)
                if digest != self.expected[name].get("sha256"):
                    raise UserError(f"shard {self.url}/{name} is corrupt (sha256 differs from {INDEX_NAME}); "
                                    "re-run `lmforge prepare`")
                os.replace(tmp, path)  # several ranks on one node may race here: same bytes, last one wins
                self.downloads += 1
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - backend errors (botocore, gcsfs) share no base class
                raise _storage_error(f"{self.url}/{name}", e) from None
            finally:
                tmp.unlink(missing_ok=True)
        return path

    def fetch_many(self, names: list[str]) -> None:
        """Fetch the shards a batch needs, several at once."""
        missing = [n for n in dict.fromkeys(names) if not self._cached(n)]
        if len(missing) <= 1:
            for n in missing:
                self.fetch(n)
            return
        with ThreadPoolExecutor(min(FETCH_THREADS, len(missing))) as pool:
            list(pool.map(self.fetch, missing))
