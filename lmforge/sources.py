"""Reading documents from local paths, globs, directories and fsspec URLs.

Formats (chosen by file name, after a compression suffix ``.gz``/``.zst``/``.bz2``/``.xz``):

- ``.jsonl``/``.ndjson``: one JSON object per line, the document in ``text_field``;
- ``.json``: a JSON array of objects (or one object); a field holding a list of strings is joined with
  newlines, a list of objects is read recursively (e.g. chinese-poetry's ``paragraphs``/``content``);
- ``.parquet``: the ``text_field`` column, streamed by row group (needs ``pyarrow``);
- anything else is text: one document per file (``txt_mode="file"``), per blank-line-separated block
  (``"blank"``) or per line (``"line"``);
- ``.warc``/``.wet`` archives and ``.html``/``.htm`` pages: one document per page, the main text
  extracted by trafilatura (``lmforge.web_inputs``);
- ``hf:NAME[:SPLIT]`` or a directory written by ``datasets.Dataset.save_to_disk`` (needs ``datasets``).

``text_field`` may list alternatives separated by commas (``paragraphs,content``): the first one present
is used. Everything streams: a file is opened when reached, jsonl/parquet/line-mode text never sit whole
in memory. Non-UTF-8 bytes are replaced with U+FFFD and counted in :class:`ReadStats`.
"""

from __future__ import annotations

import bz2
import dataclasses
import errno
import fnmatch
import glob as _glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge import web_inputs as web
from lmforge.config import UserError, loads_bounded
from lmforge.web_inputs import HTML_SUFFIXES, WARC_SUFFIXES

COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
# Files picked up when a directory is given (explicit files and globs are always read).
DIR_EXTENSIONS = (".txt", ".text", ".jsonl", ".ndjson", ".json", ".parquet", ".py", ".md",
                  ".warc", ".wet", ".html", ".htm")  # web formats: lmforge.web_inputs
# Metadata that sits beside data in a directory and holds no documents (skipped unless --include names it).
DIR_METADATA = frozenset({"manifest.json", "index.json", "config.json", "metadata.json", "dataset_info.json",
                          "state.json", "package.json", "package-lock.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "sha256sums", "source.md",
                          "readme.md", "license.md"})
TXT_MODES = ("file", "blank", "line")
_REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = _REPLACEMENT.encode()
_URL_SIZES: dict[str, int] = {}  # remote object sizes seen while resolving inputs (s3://, gs://)


@dataclasses.dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    invalid_utf8_documents: int = 0
    replaced_chars: int = 0
    skipped_files: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)  # the skipped files (inside directories)
    # web inputs (lmforge.web_inputs): pages read, records that are not pages, pages without main text
    web_pages: int = 0
    web_skipped_records: int = 0
    web_no_main_text: int = 0

    def add(self, other: ReadStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def refuse_symlink_loop(path: str | os.PathLike, flag: str = "--input") -> None:
    """A one-line UserError when a local ``path`` (or a folder on the way to it) is a symbolic link loop,
    which ``Path.resolve`` reports as a RuntimeError (Python < 3.13) or ELOOP. URLs and hf: names pass."""
    text = str(path)
    if not text or is_url(text) or text.startswith(("hf:", "hfdisk:")):
        return
    try:
        Path(os.path.abspath(os.path.expanduser(text))).resolve(strict=False)
        os.stat(text)
    except RuntimeError:
        pass
    except OSError as e:
        if e.errno != errno.ELOOP:
            return
    else:
        return
    raise UserError(f"{flag} '{text}' goes through a symbolic link loop; fix the link or pass the real path")


def is_url(path: str) -> bool:
    return "://" in path


def _strip_compression(name: str) -> tuple[str, str | None]:
    low = name.lower()
    for ext in COMPRESSIONS:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    return name, None


def file_format(path: str) -> str:
    """'jsonl' | 'json' | 'parquet' | 'warc' | 'html' | 'hf' | 'text' from the file name."""
    if path.startswith("hf:") or path.startswith("hfdisk:"):
        return "hf"
    base, _ = _strip_compression(path)
    low = base.lower()
    if low.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if low.endswith(".json"):
        return "json"
    if low.endswith(".parquet"):
        return "parquet"

    if low.endswith(WARC_SUFFIXES):
        return "warc"
    if low.endswith(HTML_SUFFIXES):
        return "html"
    return "text"


def _dir_wanted(name: str, include: list[str] | None = None) -> bool:
    """Whether a file found while walking a directory is read: by ``include`` patterns when given
    (``*.py``), else by extension (DIR_EXTENSIONS, optionally compressed)."""
    name = name.rsplit("/", 1)[-1]
    if name.startswith("."):
        return False
    if include:
        return any(fnmatch.fnmatch(name, pat) for pat in include)
    base, _ = _strip_compression(name)
    return base.lower().endswith(DIR_EXTENSIONS) and base.lower() not in DIR_METADATA


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file() or (
        path.is_dir() and (path / "dataset_dict.json").is_file())


def resolve_inputs(inputs: list[str] | str, stats: ReadStats | None = None,
                   include: list[str] | str | None = None) -> list[str]:
    """Expand paths, globs, directories and URLs into a sorted, de-duplicated list of files.

    The order is deterministic: inputs in the given order, each expanded in sorted order. Inside
    directories only files matching ``include`` (file-name patterns such as ``*.py``; default: the
    DIR_EXTENSIONS) are taken; the others are counted in ``stats.skipped_files``.
    """
    if isinstance(include, str):
        include = [p.strip() for p in include.split(",") if p.strip()]
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise UserError("no input given; pass --input PATH (a file, directory, glob or URL)")
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for item in inputs:
        if item.startswith("hf:"):
            add(item)
        elif is_url(item):
            for p in _resolve_url(item, stats, include):
                add(p)
        else:
            refuse_symlink_loop(item, "--input")
            p = Path(item).expanduser()
            if any(c in item for c in "*?["):
                matches = sorted(_glob.glob(str(p), recursive=True))
                files = [m for m in matches if Path(m).is_file()]
                if not files:
                    raise UserError(f"input glob '{item}' matches no file; check the pattern")
                for m in files:
                    add(m)
            elif _is_saved_dataset(p):
                add("hfdisk:" + str(p))
            elif p.is_dir():
                found = 0
                for root, dirs, names in os.walk(p):
                    dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                    for name in sorted(names):
                        if _dir_wanted(name, include):
                            add(os.path.join(root, name))
                            found += 1
                        elif stats is not None:
                            stats.skipped_files += 1
                            stats.skipped.append(os.path.join(root, name))
                if not found:
                    what = ", ".join(include) if include else (", ".join(DIR_EXTENSIONS) + ", optionally "
                                                               "compressed, not metadata such as MANIFEST.json")
                    raise UserError(f"input directory '{item}' holds no readable file ({what})")
            elif p.is_file():
                add(str(p))
            else:
                raise UserError(f"input '{item}' does not exist; pass an existing file, directory, glob or URL")
    return out


def _resolve_url(url: str, stats: ReadStats | None, include: list[str] | None = None) -> list[str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise UserError(f"input '{url}' needs an fsspec backend that is not installed ({e}); "
                        "install it (e.g. pip install s3fs / gcsfs)") from None
    except ValueError as e:
        raise UserError(f"input '{url}' is not a usable URL: {e}") from None
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol

    def full(p: str) -> str:
        return p if "://" in p else f"{protocol}://{p.lstrip('/') if protocol != 'memory' else p}"

    def sized(p: str, info: dict[str, Any]) -> str:
        if info.get("size") is not None and protocol != "memory":  # small remote files go to the workers
            # (memory:// lives in this process only: its files stay with the main process)
            _URL_SIZES[full(p)] = int(info["size"])
        return full(p)

    try:
        if any(c in path for c in "*?["):
            found = fs.glob(path, detail=True)
            files = sorted(p for p, info in found.items() if info.get("type") == "file")
            if not files:
                raise UserError(f"input glob '{url}' matches no file; check the pattern")
            return [sized(p, found[p]) for p in files]
        if fs.isdir(path):
            files = []
            found = fs.find(path, detail=True)
            for p in sorted(found):
                if _dir_wanted(p, include):
                    files.append(sized(p, found[p]))
                elif stats is not None:
                    stats.skipped_files += 1
                    stats.skipped.append(full(p))
            if not files:
                raise UserError(f"input directory '{url}' holds no readable file")
            return files
        if fs.isfile(path):
            sized(path, fs.info(path) if protocol != "memory" else {})
            return [url]
    except UserError:
        raise
    except (OSError, PermissionError) as e:  # a missing bucket, no credentials, no network
        raise UserError(f"input '{url}' cannot be read: {type(e).__name__}: {e}") from None
    except Exception as e:  # backend-specific errors (botocore, gcsfs) have no common base class
        raise UserError(f"input '{url}' cannot be read: {type(e).__name__}: {e}") from None
    raise UserError(f"input '{url}' does not exist; check the bucket and path")


def open_binary(path: str) -> BinaryIO:
    """Open a local file or URL for reading bytes, decompressing by suffix."""
    try:
        if is_url(path):
            import fsspec

            raw = fsspec.open(path, "rb").open()
        else:
            raw = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"input '{path}' does not exist") from None
    except OSError as e:
        raise UserError(f"input '{path}' cannot be read: {e}") from None
    _, comp = _strip_compression(path)
    if comp == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if comp in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore
    if comp == ".bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if comp == ".xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return raw  # type: ignore[return-value]


def decode(data: bytes, stats: ReadStats | None = None) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted (a UTF-8 BOM is dropped)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        if stats is not None:
            stats.invalid_utf8_documents += 1
            stats.replaced_chars += text.count(_REPLACEMENT) - data.count(_REPLACEMENT_BYTES)
    text = text.removeprefix("\ufeff")
    return text


def _read_all(path: str) -> bytes:
    try:
        with open_binary(path) as f:
            return f.read()
    except UserError:
        raise
    except (OSError, EOFError, ValueError) as e:  # truncated gzip / zstd, unreadable file
        raise UserError(f"input '{path}' cannot be read: {type(e).__name__}: {e}") from None
    except Exception as e:  # zstandard.ZstdError and friends
        raise UserError(f"input '{path}' cannot be read: {type(e).__name__}: {e}") from None


def _fields(text_field: str) -> list[str]:
    fields = [f.strip() for f in str(text_field).split(",") if f.strip()]
    if not fields:
        raise UserError("--text-field is empty; pass the name of the field holding the text (e.g. text)")
    return fields


def _record_text(rec: Any, fields: list[str], where: str) -> list[str]:
    """The document(s) in one JSON record; a missing field is an error naming ``where``."""
    if isinstance(rec, str):
        return [rec]
    if not isinstance(rec, dict):
        raise UserError(f"{where} is a {type(rec).__name__}, not an object with field '{fields[0]}'")
    for f in fields:
        if f in rec:
            value = rec[f]
            break
    else:
        keys = ", ".join(list(rec)[:8])
        raise UserError(f"{where} has no field '{','.join(fields)}' (fields: {keys}); "
                        "pass --text-field NAME")
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return ["\n".join(value)]
        out: list[str] = []
        for i, v in enumerate(value):
            out.extend(_record_text(v, fields, f"{where}.{f}[{i}]"))
        return out
    return [str(value)]


def _iter_text(path: str, txt_mode: str, stats: ReadStats) -> Iterator[str]:
    if txt_mode == "file":
        data = _read_all(path)
        stats.bytes += len(data)
        yield decode(data, stats)
        return
    if txt_mode not in TXT_MODES:
        raise UserError(f"txt mode '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
    block: list[bytes] = []
    try:
        with open_binary(path) as f:
            for raw in f:
                stats.bytes += len(raw)
                if txt_mode == "line":
                    line = raw.rstrip(b"\r\n")
                    if line.strip():
                        yield decode(line, stats)
                    continue
                if raw.strip():
                    block.append(raw)
                elif block:
                    yield decode(b"".join(block).rstrip(b"\r\n"), stats)
                    block = []
    except (OSError, EOFError) as e:
        raise UserError(f"input '{path}' cannot be read: {type(e).__name__}: {e}") from None
    if block:
        yield decode(b"".join(block).rstrip(b"\r\n"), stats)


def _iter_jsonl(path: str, fields: list[str], stats: ReadStats) -> Iterator[str]:
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                stats.bytes += len(raw)
                if not raw.strip():
                    continue
                line = decode(raw, stats)
                try:
                    rec = loads_bounded(line, f"{path}:{lineno}")
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove the line") from None
                yield from _record_text(rec, fields, f"{path}:{lineno}")
    except (OSError, EOFError) as e:
        raise UserError(f"input '{path}' cannot be read: {type(e).__name__}: {e}") from None


def _iter_json(path: str, fields: list[str], stats: ReadStats) -> Iterator[str]:
    data = _read_all(path)
    stats.bytes += len(data)
    try:
        obj = loads_bounded(decode(data, stats), path, max_chars=None)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    items = obj if isinstance(obj, list) else [obj]
    for i, rec in enumerate(items):
        yield from _record_text(rec, fields, f"{path} item {i}")


def _iter_parquet(path: str, fields: list[str], stats: ReadStats) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading '{path}' needs pyarrow; pip install 'lmforge[parquet]'") from None
    try:
        f = open_binary(path)
        pf = pq.ParquetFile(f)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    col = next((c for c in fields if c in names), None)
    if col is None:
        raise UserError(f"{path} has no column '{','.join(fields)}' (columns: {', '.join(names[:8])}); "
                        "pass --text-field NAME")
    with f:
        for batch in pf.iter_batches(columns=[col], batch_size=1024):
            for v in batch.column(0).to_pylist():
                text = "" if v is None else v if isinstance(v, str) else "\n".join(map(str, v)) \
                    if isinstance(v, list) else str(v)
                stats.bytes += len(text.encode("utf-8", errors="replace"))
                yield text


def _iter_hf(spec: str, fields: list[str], stats: ReadStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"input '{spec}' needs the `datasets` package; pip install datasets") from None
    try:
        if spec.startswith("hfdisk:"):
            ds = datasets.load_from_disk(spec[len("hfdisk:"):])
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
        else:
            name, _, split = spec[3:].partition(":")
            ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:
        raise UserError(f"dataset '{spec}' cannot be loaded: {type(e).__name__}: {e}") from None
    for i, rec in enumerate(ds):
        for text in _record_text(rec, fields, f"{spec} row {i}"):
            stats.bytes += len(text.encode("utf-8", errors="replace"))
            yield text


def _iter_web(path: str, fmt: str, stats: ReadStats) -> Iterator[str]:
    if fmt == "html":
        yield from web.html_page(_read_all(path), stats)
        return
    try:
        with open_binary(path) as f:
            yield from web.iter_warc_pages(f, stats, path)
    except OSError as e:
        raise UserError(f"input '{path}' cannot be read: {type(e).__name__}: {e}") from None


def iter_file_documents(path: str, text_field: str = "text", txt_mode: str = "file",
                        stats: ReadStats | None = None) -> Iterator[str]:
    """Documents of one resolved input, in order."""
    stats = stats if stats is not None else ReadStats()
    fields = _fields(text_field)
    fmt = file_format(path)
    stats.files += 1
    if fmt == "jsonl":
        it = _iter_jsonl(path, fields, stats)
    elif fmt == "json":
        it = _iter_json(path, fields, stats)
    elif fmt == "parquet":
        it = _iter_parquet(path, fields, stats)
    elif fmt == "hf":
        it = _iter_hf(path, fields, stats)
    elif fmt in ("warc", "html"):
        it = _iter_web(path, fmt, stats)
    else:
        it = _iter_text(path, txt_mode, stats)
    for doc in it:
        stats.documents += 1
        yield doc


def iter_documents(inputs: list[str] | str, text_field: str = "text", txt_mode: str = "file",
                   stats: ReadStats | None = None, include: list[str] | str | None = None) -> Iterator[str]:
    """All documents of all inputs, in a deterministic order."""
    stats = stats if stats is not None else ReadStats()
    if txt_mode not in TXT_MODES:
        raise UserError(f"txt mode '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
    for path in resolve_inputs(inputs, stats, include):
        yield from iter_file_documents(path, text_field, txt_mode, stats)


def file_size(path: str) -> int | None:
    """Size in bytes of a local file or of a remote object listed by :func:`resolve_inputs` (None for
    datasets and for URLs not listed)."""
    if is_url(path):
        return _URL_SIZES.get(path)
    if path.startswith(("hf:", "hfdisk:")):
        return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None
