"""Web inputs: WARC / WET archives and HTML pages -> main text, one document per page.

- ``.warc`` / ``.warc.gz``: ``response`` (and ``resource``) records whose HTTP ``Content-Type`` is HTML are
  passed through trafilatura's main-text extraction (menus, footers, cookie banners, sidebars dropped;
  ``favor_precision`` as FineWeb used it); ``text/plain`` records are taken as they are; requests,
  metadata, images, scripts … are skipped and counted.
- ``.wet`` / ``.wet.gz`` (Common Crawl's extracted text): ``conversion`` records are already text.
- ``.html`` / ``.htm``: one page per file, extracted the same way.

Reading is streamed record by record (warcio); nothing here holds a whole archive in memory. Counts land
in :class:`lmforge.sources.ReadStats` (``web_pages``, ``web_skipped_records``, ``web_no_main_text``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from lmforge.config import UserError

WARC_SUFFIXES = (".warc", ".wet", ".arc")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
_HTML_TYPES = ("text/html", "application/xhtml+xml")


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


def iter_warc_pages(stream: BinaryIO, stats: Any, name: str = "input") -> Iterator[str]:
    """Main texts of the HTML / text records of one WARC or WET stream (decompressed or gzip)."""
    ArchiveIterator = _archive_iterator()
    try:
        for record in ArchiveIterator(stream, arc2warc=True):
            rtype = record.rec_type
            stats.bytes += int(record.length or 0)
            if rtype == "conversion":  # WET: text already extracted by the crawler
                stats.web_pages += 1
                text = record.content_stream().read().decode("utf-8", errors="replace").strip()
            elif rtype in ("response", "resource"):
                ctype = _content_type(record)
                if ctype in _HTML_TYPES:
                    stats.web_pages += 1
                    text = extract_main_text(record.content_stream().read())
                elif ctype == "text/plain":
                    stats.web_pages += 1
                    text = record.content_stream().read().decode("utf-8", errors="replace").strip()
                else:
                    stats.web_skipped_records += 1
                    continue
            else:  # warcinfo, request, metadata, revisit
                stats.web_skipped_records += 1
                continue
            if not text:
                stats.web_no_main_text += 1
                continue
            yield text
    except Exception as e:  # noqa: BLE001 -- warcio.ArchiveLoadFailed, truncated gzip, not a WARC at all
        raise UserError(f"'{name}' is not a readable WARC/WET archive ({type(e).__name__}: {e}); "
                        "check the file, or name it .html / .txt if it is not an archive") from None


def html_page(data: bytes, stats: Any) -> Iterator[str]:
    """The main text of one HTML file (nothing when extraction finds no main text)."""
    stats.web_pages += 1
    stats.bytes += len(data)
    text = extract_main_text(data)
    if not text:
        stats.web_no_main_text += 1
        return
    yield text
