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

Bounds (``max_doc_bytes``, ``max_file_bytes``; ``prepare`` passes its ``--max-doc-bytes`` /
``--max-file-bytes``): a document (a jsonl line, a text line, block or file, an HTML file, a WARC record's
payload, a parquet cell) longer than ``max_doc_bytes`` decompressed bytes is skipped and counted in
``ReadStats.too_large`` *while it is read*: it is read and dropped in chunks of 1 MiB, never held whole; a
``.json`` file (parsed whole) over ``max_file_bytes`` is skipped the same way. Decompression is streamed
with bounded output for every codec. A truncated or corrupt file (gzip, zstd, bz2, xz, WARC, parquet,
JSON) raises :class:`BadInputFile` naming it, or with ``skip_bad_files`` is named in
``ReadStats.bad_files`` and reading goes on with the next file (the documents read before the damage are
kept). ``ReadStats.bytes`` counts the decompressed bytes actually read.
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
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmforge import web_inputs as web
from lmforge.config import UserError, loads_bounded
from lmforge.web_inputs import HTML_SUFFIXES, WARC_SUFFIXES, BadInputFile, read_capped

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
MAX_DOC_BYTES = 8 << 20  # prepare's default --max-doc-bytes: web pages and most books fit, a bomb does not
MAX_FILE_BYTES = 64 << 20  # prepare's default --max-file-bytes: a .json file is parsed whole
_CHUNK = 1 << 20  # bytes read at a time (decompressed)
# BadInputFile (a truncated / corrupt input) is defined in web_inputs, whose WARC reader raises it too.
_ZSTD_FEED = 1 << 10  # compressed bytes per zstd step: at most ~32 MB out (zstd's worst ratio is ~1:32768)


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
    too_large: int = 0  # documents (.json files) over max_doc_bytes (max_file_bytes): read, dropped, never held
    bad_files: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, why): skip_bad_files

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
        return io.BufferedReader(_ZstdReader(raw), _CHUNK)  # type: ignore[return-value]
    if comp == ".bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if comp == ".xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return raw  # type: ignore[return-value]


class _ZstdReader(io.RawIOBase):
    """zstd frames decompressed with bounded output (small compressed steps) that raise EOFError when the
    input ends inside a frame: ``zstandard``'s stream reader returns a truncated file's bytes silently."""

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._zstd, self._raw = zstandard, raw
        self._dec: Any = None
        self._in, self._ipos = b"", 0
        self._out, self._opos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._opos >= len(self._out):
            if self._ipos >= len(self._in):
                self._in, self._ipos = self._raw.read(1 << 16), 0
                if not self._in:
                    if self._dec is not None and not self._dec.eof:
                        raise EOFError("zstd data ends inside a frame: the file is truncated")
                    return 0
            if self._dec is None or self._dec.eof:
                self._dec = self._zstd.ZstdDecompressor().decompressobj()
            piece = self._in[self._ipos:self._ipos + _ZSTD_FEED]
            self._ipos += len(piece)
            self._out, self._opos = self._dec.decompress(piece), 0
            if self._dec.eof and self._dec.unused_data:  # the next frame starts inside this piece
                self._in, self._ipos = self._dec.unused_data + self._in[self._ipos:], 0
        n = min(len(b), len(self._out) - self._opos)
        b[:n] = self._out[self._opos:self._opos + n]
        self._opos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


# Errors a decompressor or container reader raises on a truncated or corrupt file.
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _zstd_error() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _bad(path: str, e: BaseException | str) -> BadInputFile:
    why = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    return BadInputFile(path, f"input '{path}' cannot be read: it is truncated or corrupt ({why})")


def _lines(f: BinaryIO, cap: int | None, stats: ReadStats) -> Iterator[bytes | None]:
    """The lines of ``f`` without their ``\\n``, read in chunks; a line over ``cap`` bytes comes out as
    None after it was read to its end chunk by chunk (never held whole). Counts bytes read."""
    pending: list[bytes] = []
    size, over = 0, False
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        stats.bytes += len(chunk)
        parts = chunk.split(b"\n")
        for part in parts[:-1]:  # each ends a line
            if over or (cap is not None and size + len(part) > cap):
                yield None
            else:
                yield b"".join((*pending, part)) if pending else part
            pending, size, over = [], 0, False
        tail = parts[-1]
        if tail and not over:
            size += len(tail)
            if cap is not None and size > cap:
                pending, over = [], True
            else:
                pending.append(tail)
    if over:
        yield None
    elif pending:
        yield b"".join(pending)


def _read_doc(f: BinaryIO, cap: int | None, stats: ReadStats) -> bytes | None:
    """All of ``f`` (bytes counted), or None when it holds more than ``cap`` bytes (the rest is read and
    dropped chunk by chunk, so a truncated file still fails)."""
    data, total = read_capped(f, cap)
    stats.bytes += total
    return data


def _doc_over(text: str, cap: int | None) -> bool:
    """Whether the UTF-8 form of ``text`` is over ``cap`` bytes (cheap for short texts)."""
    if cap is None or len(text) * 4 <= cap:
        return False
    return len(text) > cap or len(text.encode("utf-8", errors="replace")) > cap


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


def _iter_text(path: str, txt_mode: str, stats: ReadStats, cap: int | None) -> Iterator[str]:
    if txt_mode not in TXT_MODES:
        raise UserError(f"txt mode '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
    with open_binary(path) as f:
        if txt_mode == "file":
            data = _read_doc(f, cap, stats)
            if data is None:
                stats.too_large += 1
            else:
                yield decode(data, stats)
            return
        block: list[bytes] = []
        size, over = 0, False
        for line in _lines(f, cap, stats):
            if txt_mode == "line":
                if line is None:
                    stats.too_large += 1
                elif line.strip():
                    yield decode(line.rstrip(b"\r"), stats)
                continue
            if line is not None and not line.strip():  # a blank line ends the block
                if over:
                    stats.too_large += 1
                elif block:
                    yield decode(b"\n".join(block).rstrip(b"\r\n"), stats)
                block, size, over = [], 0, False
                continue
            if over:
                continue
            size += (cap or 0) + 1 if line is None else len(line) + 1
            if line is None or (cap is not None and size > cap):
                block, over = [], True
            else:
                block.append(line)
        if over:
            stats.too_large += 1
        elif block:
            yield decode(b"\n".join(block).rstrip(b"\r\n"), stats)


def _iter_jsonl(path: str, fields: list[str], stats: ReadStats, cap: int | None) -> Iterator[str]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(_lines(f, cap, stats), 1):
            if raw is None:
                stats.too_large += 1
                continue
            if not raw.strip():
                continue
            line = decode(raw, stats)
            try:
                rec = loads_bounded(line, f"{path}:{lineno}")
            except json.JSONDecodeError as e:
                raise BadInputFile(path, f"{path}:{lineno} is not valid JSON ({e.msg})",
                                   "fix or remove the line") from None
            for text in _record_text(rec, fields, f"{path}:{lineno}"):
                if _doc_over(text, cap):
                    stats.too_large += 1
                else:
                    yield text


def _iter_json(path: str, fields: list[str], stats: ReadStats, cap: int | None,
               file_cap: int | None) -> Iterator[str]:
    with open_binary(path) as f:
        data = _read_doc(f, file_cap, stats)
    if data is None:  # parsed whole: a file over the cap is skipped like a too-large document
        stats.too_large += 1
        return
    try:
        obj = loads_bounded(decode(data, stats), path, max_chars=None)
    except json.JSONDecodeError as e:
        raise BadInputFile(path, f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    del data
    items = obj if isinstance(obj, list) else [obj]
    for i, rec in enumerate(items):
        for text in _record_text(rec, fields, f"{path} item {i}"):
            if _doc_over(text, cap):
                stats.too_large += 1
            else:
                yield text


def _iter_parquet(path: str, fields: list[str], stats: ReadStats, cap: int | None) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading '{path}' needs pyarrow; pip install 'lmforge[parquet]'") from None
    f = open_binary(path)
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001 -- pyarrow's ArrowInvalid / ArrowIOError / OSError: not parquet
        f.close()
        raise BadInputFile(path, f"{path} is not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    col = next((c for c in fields if c in names), None)
    if col is None:
        f.close()
        raise UserError(f"{path} has no column '{','.join(fields)}' (columns: {', '.join(names[:8])}); "
                        "pass --text-field NAME")
    with f:
        batches = pf.iter_batches(columns=[col], batch_size=256)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, *_READ_ERRORS) as e:  # a truncated or corrupt page / row group
                raise _bad(path, e) from None
            column = batch.column(0)
            if cap is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                                    or pa.types.is_binary(column.type)):
                over = pc.fill_null(pc.greater(pc.binary_length(column), cap), False)
                n_over = pc.sum(over).as_py() or 0
                if n_over:  # dropped before they become Python strings
                    stats.too_large += n_over
                    column = pc.filter(column, pc.invert(over))
            for v in column.to_pylist():
                text = "" if v is None else v if isinstance(v, str) else "\n".join(map(str, v)) \
                    if isinstance(v, list) else str(v)
                if _doc_over(text, cap):
                    stats.too_large += 1
                    continue
                stats.bytes += len(text.encode("utf-8", errors="replace"))
                yield text


def _iter_hf(spec: str, fields: list[str], stats: ReadStats, cap: int | None) -> Iterator[str]:
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
            if _doc_over(text, cap):
                stats.too_large += 1
                continue
            stats.bytes += len(text.encode("utf-8", errors="replace"))
            yield text


def _iter_web(path: str, fmt: str, stats: ReadStats, cap: int | None) -> Iterator[str]:
    with open_binary(path) as f:
        if fmt == "html":
            data = _read_doc(f, cap, stats)
            if data is None:
                stats.too_large += 1
                return
            yield from web.html_page(data, stats)
            return
        yield from web.iter_warc_pages(f, stats, path, cap)


def iter_file_documents(path: str, text_field: str = "text", txt_mode: str = "file",
                        stats: ReadStats | None = None, max_doc_bytes: int | None = None,
                        max_file_bytes: int | None = None, skip_bad_files: bool = False) -> Iterator[str]:
    """Documents of one resolved input, in order.

    ``max_doc_bytes`` / ``max_file_bytes`` (None: no cap) skip and count over-long documents and ``.json``
    files while reading (``stats.too_large``). A truncated or corrupt file raises :class:`BadInputFile`;
    with ``skip_bad_files`` it is recorded in ``stats.bad_files`` instead and its remaining documents are
    not read.
    """
    stats = stats if stats is not None else ReadStats()
    fields = _fields(text_field)
    fmt = file_format(path)
    stats.files += 1
    if fmt == "jsonl":
        it = _iter_jsonl(path, fields, stats, max_doc_bytes)
    elif fmt == "json":
        it = _iter_json(path, fields, stats, max_doc_bytes, max_file_bytes)
    elif fmt == "parquet":
        it = _iter_parquet(path, fields, stats, max_doc_bytes)
    elif fmt == "hf":
        it = _iter_hf(path, fields, stats, max_doc_bytes)
    elif fmt in ("warc", "html"):
        it = _iter_web(path, fmt, stats, max_doc_bytes)
    else:
        it = _iter_text(path, txt_mode, stats, max_doc_bytes)
    try:
        for doc in it:
            stats.documents += 1
            yield doc
    except BadInputFile as e:
        if not skip_bad_files:
            raise
        stats.bad_files.append((path, e.reason))
    except UserError:
        raise
    except (*_READ_ERRORS, *_zstd_error()) as e:  # truncated gzip / bz2 / xz / zstd, unreadable bytes
        if not skip_bad_files:
            raise _bad(path, e) from None
        stats.bad_files.append((path, _bad(path, e).reason))


def iter_documents(inputs: list[str] | str, text_field: str = "text", txt_mode: str = "file",
                   stats: ReadStats | None = None, include: list[str] | str | None = None,
                   max_doc_bytes: int | None = None, max_file_bytes: int | None = None,
                   skip_bad_files: bool = False) -> Iterator[str]:
    """All documents of all inputs, in a deterministic order (caps and ``skip_bad_files`` as in
    :func:`iter_file_documents`)."""
    stats = stats if stats is not None else ReadStats()
    if txt_mode not in TXT_MODES:
        raise UserError(f"txt mode '{txt_mode}' is not one of {', '.join(TXT_MODES)}")
    for path in resolve_inputs(inputs, stats, include):
        yield from iter_file_documents(path, text_field, txt_mode, stats, max_doc_bytes, max_file_bytes,
                                       skip_bad_files)


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
