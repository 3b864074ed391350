"""Web inputs: WARC / WET archives and HTML pages -> main text, one document per page.

- ``.warc`` / ``.warc.gz``: ``response`` (and ``resource``) records whose HTTP ``Content-Type`` is HTML are
  passed through trafilatura's main-text extraction (menus, footers, cookie banners, sidebars dropped;
  ``favor_precision`` as FineWeb used it); ``text/plain`` records are taken as they are; requests,
  metadata, images, scripts … are skipped and counted.
- ``.wet`` / ``.wet.gz`` (Common Crawl's extracted text): ``conversion`` records are already text.
- ``.html`` / ``.htm``: one page per file, extracted the same way.

Reading is streamed record by record (warcio); nothing here holds a whole archive in memory, and a record's
payload is read in chunks of 1 MiB up to ``cap`` bytes: a longer one is read to its end, dropped and counted
(``too_large``). Counts land in :class:`lmforge.sources.ReadStats` (``web_pages``, ``web_skipped_records``,
``web_no_main_text``, ``too_large``; ``bytes`` are the archive's bytes actually read, never a declared
``Content-Length``). A record shorter than its ``Content-Length`` (a cut archive) or an unreadable archive is a
:class:`BadInputFile`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from lmforge.config import UserError

WARC_SUFFIXES = (".warc", ".wet", ".arc")
_CHUNK = 1 << 20
HEADER_LIMIT = 1 << 20  # a record's WARC + HTTP headers: a few hundred bytes in any real archive
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_HTML_TYPES = ("text/html", "application/xhtml+xml")


class BadInputFile(UserError):
    """A truncated or corrupt input file (any format ``lmforge.sources`` reads); ``prepare --skip-bad-files``
    names it in the report and goes on with the next file. ``reason`` names the file and what is wrong."""

    def __init__(self, path: str, reason: str, fix: str = "fix or remove the file"):
        reason = " ".join(reason.split()).rstrip(".")  # library messages (pyarrow's) may span lines: one line
        super().__init__(f"{reason}; {fix}, or pass --skip-bad-files to skip bad files")
        self.path, self.reason, self.fix = path, reason, fix

    def __reduce__(self):  # raised in worker processes: pickled with its arguments
        return (type(self), (self.path, self.reason, self.fix))


def read_capped(f: Any, cap: int | None) -> tuple[bytes | None, int]:
    """Read ``f`` to its end in chunks: ``(data, n)``, or ``(None, n)`` when it holds more than ``cap`` bytes
    (the rest is read and dropped, never held: at most ``cap`` + 1 MiB in memory). ``n``: bytes read."""
    parts: list[bytes] = []
    total, over = 0, False
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if over:
            continue
        if cap is not None and total > cap:
            parts, over = [], True
        else:
            parts.append(chunk)
    return (None if over else b"".join(parts)), total


class _Cut(Exception):
    """The decompressed stream under a WARC ended early (a cut .warc.gz). Not an EOFError: warcio takes an
    EOFError from its input for the end of the archive and stops without a word."""


class _HeadersTooLong(Exception):
    """warcio reads headers line by line into memory: a header block over HEADER_LIMIT is refused."""


class _Counted:
    """A read-only stream that counts the bytes read through it (what an archive really held), turns a
    decompressor's EOFError into :class:`_Cut`, and while ``armed`` (warcio parsing a record's headers)
    refuses to read more than HEADER_LIMIT: warcio would hold a hostile endless header line whole."""

    def __init__(self, stream: Any):
        self.stream, self.n = stream, 0
        self.armed: int | None = None  # self.n when header parsing began

    def _count(self, data: bytes) -> bytes:
        self.n += len(data)
        if self.armed is not None and self.n - self.armed > HEADER_LIMIT:
            raise _HeadersTooLong(f"a record's headers run past {HEADER_LIMIT:,} bytes")
        return data

    def read(self, size: int = -1) -> bytes:
        try:
            return self._count(self.stream.read(size))
        except EOFError as e:
            raise _Cut(str(e)) from None

    def readline(self, size: int = -1) -> bytes:
        try:
            return self._count(self.stream.readline(size))
        except EOFError as e:
            raise _Cut(str(e)) from None

    def tell(self) -> int:  # warcio keeps record offsets with it
        return self.n

    def close(self) -> None:
        self.stream.close()


def _missing(package: str) -> UserError:
    return UserError(f"web inputs need `{package}`; pip install 'lmforge[web]'")


def _trafilatura():
    try:
        import trafilatura
    except ImportError:
        raise _missing("trafilatura") from None
    return trafilatura


def _archive_iterator():
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise _missing("warcio") from None
    return ArchiveIterator


def extract_main_text(html: bytes | str) -> str:
    """Main text of one HTML page (trafilatura; boilerplate removed); ``""`` when it finds none.

    Paragraphs come out one per line, so the line-based quality rules (C4, FineWeb) see the page's
    structure.
    """
    trafilatura = _trafilatura()
    if not html:
        return ""
    try:
        text = trafilatura.extract(html, include_comments=False, include_tables=False, include_images=False,
                                   favor_precision=True, deduplicate=False, with_metadata=False)
    except Exception:  # noqa: BLE001 -- malformed markup that lxml cannot parse: no main text, not a crash of the run
        return ""
    return (text or "").strip()


def _content_type(record: Any) -> str:
    headers = record.http_headers if record.http_headers is not None else record.rec_headers
    value = headers.get_header("Content-Type") or ""
    return value.split(";", 1)[0].strip().lower()


def iter_warc_pages(stream: BinaryIO, stats: Any, name: str = "input", cap: int | None = None) -> Iterator[str]:
    """Main texts of the HTML / text records of one WARC or WET stream (decompressed or gzip); a record
    payload over ``cap`` bytes is skipped (``stats.too_large``) without being held whole."""
    ArchiveIterator = _archive_iterator()
    counted = _Counted(stream)
    seen = 0

    def bad(why: str, not_warc: bool = False) -> BadInputFile:
        hint = "; name it .html / .txt if it is not an archive" if not_warc else ""
        return BadInputFile(name, f"'{name}' is not a readable WARC/WET archive ({why}){hint}")

    def count() -> None:
        nonlocal seen
        stats.bytes += counted.n - seen
        seen = counted.n

    try:
        records = iter(ArchiveIterator(counted, arc2warc=True))
        while True:
            counted.armed = counted.n  # warcio reads the next record's headers (in memory): bounded
            record = next(records, None)
            counted.armed = None
            if record is None:
                break
            rtype = record.rec_type
            kind = None
            if rtype == "conversion":  # WET: text already extracted by the crawler
                kind = "text"
            elif rtype in ("response", "resource"):
                ctype = _content_type(record)
                kind = "html" if ctype in _HTML_TYPES else "text" if ctype == "text/plain" else None
            payload, _ = read_capped(record.content_stream(), cap) if kind else (None, 0)
            while record.raw_stream.read(_CHUNK):  # the rest of the record, so its length can be checked
                pass
            missing = getattr(record.raw_stream, "limit", 0)
            count()
            if missing:
                declared = record.rec_headers.get_header("Content-Length")
                raise bad(f"a record declares Content-Length {declared} but the archive ends {missing:,} bytes "
                          "short: truncated")
            if kind is None:  # warcinfo, request, metadata, revisit; images, scripts …
                stats.web_skipped_records += 1
                continue
            if payload is None:
                stats.too_large += 1
                continue
            stats.web_pages += 1
            if kind == "html":
                text = extract_main_text(payload)
            else:
                text = payload.decode("utf-8", errors="replace").strip()
            del payload
            if not text:
                stats.web_no_main_text += 1
                continue
            yield text
        count()
    except BadInputFile:
        raise
    except _Cut as e:
        count()
        raise bad(f"the compressed data ends early: {e}") from None
    except _HeadersTooLong as e:
        count()
        raise bad(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- warcio.ArchiveLoadFailed, a corrupt gzip, not a WARC at all
        count()
        raise bad(f"{type(e).__name__}: {e}", not_warc=True) from None


def html_page(data: bytes, stats: Any) -> Iterator[str]:
    """The main text of one HTML file (nothing when extraction finds no main text)."""
    stats.web_pages += 1
    text = extract_main_text(data)
    if not text:
        stats.web_no_main_text += 1
        return
    yield text
