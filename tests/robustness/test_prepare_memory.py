"""`lmforge prepare`'s memory is bounded however far its input expands (issue 22, "Memory is unbounded per
document"): real subprocesses, peak RSS from ``wait4``.

Before the caps, a 58 KB gzip of one 40 MB line peaked at 5.2 GB, a 0.7 MB gzip of one 500 MB line was
killed by the OOM killer at 19 GB (leaving ``.OUT.tmp*``), and a 763 KB ``.warc.gz`` holding one 300 MB
HTML record peaked at 5.6 GB, then said "no text left … check --text-field". The bound stated in
docs/guide/data.md: per process, about 100 MB plus ~170 bytes per byte of the longest document kept (plus
~5 bytes per byte of a .json file being parsed), so under 2 GiB with the default caps; over-cap documents
cost nothing.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20
OVER_CAP_BOUND = 300 * MB  # measured ~60 MB: interpreter, numpy, tokenizer and 1 MiB read chunks
GOOD = [f"a good document number {i} that is long enough to keep" for i in range(3)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, [f"plain words number {i} for a small tokenizer." for i in range(200)], vocab_size=300)
    return d / "out"


def _big_line_gz(path: Path, n_mb: int, jsonl: bool, good: list[str]) -> None:
    """One line of ``n_mb`` MiB (inside {"text": …} for jsonl), then ``good`` lines; written streaming."""
    chunk = b"abcdefghij" * (MB // 10)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(b'{"text": "' if jsonl else b"")
        for _ in range(n_mb):
            f.write(chunk)
        f.write(b'"}\n' if jsonl else b"\n")
        for line in good:
            f.write((json.dumps({"text": line}) if jsonl else line).encode() + b"\n")


def _warc_record(body_parts, body_len: int, ctype: bytes, n: int) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\n\r\n"
    yield (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-00000000000"
           + str(n).encode() + b">\r\nWARC-Target-URI: https://x.example/" + str(n).encode()
           + b"\r\nWARC-Date: 2024-01-01T00:00:00Z\r\nContent-Type: application/http; msgtype=response\r\n"
           b"Content-Length: " + str(len(head) + body_len).encode() + b"\r\n\r\n" + head)
    yield from body_parts
    yield b"\r\n\r\n"


def _big_warc_gz(path: Path, n_mb: int) -> None:
    """One HTML record of ``n_mb`` MiB, then a small text/plain record; written streaming."""
    chunk = b"word word " * (MB // 10)
    html = [b"<html><body><p>", *(chunk for _ in range(n_mb)), b"</p></body></html>"]
    with gzip.open(path, "wb", compresslevel=1) as f:
        for part in _warc_record(html, 15 + n_mb * len(chunk) + 18, b"text/html", 1):
            f.write(part)
        for part in _warc_record([GOOD[0].encode()], len(GOOD[0]), b"text/plain", 2):
            f.write(part)


# A fork inherits its parent's resident pages in ru_maxrss (kept across exec): pytest's own memory would count.
# So a small fresh launcher starts prepare and reports that child's peak alone.
_LAUNCH = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1] + ".out", "wb"), stderr=open(sys.argv[1] + ".err", "wb"))
_, status, usage = os.wait4(p.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024)
"""


def _prepare(tmp_path: Path, tok: Path, inp: Path, *extra: str) -> tuple[int, int, str, str]:
    """Run `lmforge prepare` in a subprocess: (exit code, its peak RSS in bytes, stdout, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _LAUNCH, str(base), sys.executable, "-m", "lmforge", "prepare",
                        "--input", str(inp), "--tokenizer", str(tok), "--out", str(tmp_path / "OUT"),
                        "--no-progress", "--json", *extra],
                       env=env, capture_output=True, text=True, timeout=600, check=True)
    rc, rss = map(int, r.stdout.split())
    assert rss > 0
    out, err = Path(str(base) + ".out"), Path(str(base) + ".err")
    return rc, rss, out.read_text(), err.read_text()


def _gunzipped_size(path: Path) -> int:
    n = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(MB):
            n += len(chunk)
    return n


def _no_leftovers(tmp_path: Path, inp: Path) -> None:
    names = sorted(p.name for p in tmp_path.iterdir())
    assert inp.name in names and not [n for n in names if n.startswith(".OUT")], names  # no .OUT.tmp* / lock left behind


def test_one_500_mb_jsonl_line_in_a_small_gzip_is_skipped_in_bounded_memory(tmp_path, tok):
    inp = tmp_path / "bomb.jsonl.gz"
    _big_line_gz(inp, 500, jsonl=True, good=[])
    assert inp.stat().st_size < 4 * MB
    rc, rss, _, err = _prepare(tmp_path, tok, inp)
    assert rc == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "all 1 document(s) were over --max-doc-bytes=8,388,608" in lines[0] and "--text-field" not in lines[0]
    assert rss < OVER_CAP_BOUND, f"peak RSS {rss / MB:.0f} MB"
    assert not (tmp_path / "OUT").exists()
    _no_leftovers(tmp_path, inp)


def test_a_40_mb_text_line_beside_good_lines(tmp_path, tok):
    inp = tmp_path / "bomb.txt.gz"
    _big_line_gz(inp, 40, jsonl=False, good=GOOD)
    rc, rss, out, err = _prepare(tmp_path, tok, inp, "--txt-mode", "line")
    assert rc == 0, err[-2000:]
    report = json.loads(out)
    assert report["skipped_too_large"] == 1 and report["documents_read"] == 3
    assert report["bytes_read"] == 40 * (MB // 10) * 10 + 1 + sum(len(g) + 1 for g in GOOD)
    assert rss < OVER_CAP_BOUND, f"peak RSS {rss / MB:.0f} MB"
    _no_leftovers(tmp_path, inp)


def test_a_300_mb_html_record_in_a_small_warc_gz(tmp_path, tok):
    inp = tmp_path / "bomb.warc.gz"
    _big_warc_gz(inp, 300)
    assert inp.stat().st_size < 4 * MB
    rc, rss, out, err = _prepare(tmp_path, tok, inp)
    assert rc == 0, err[-2000:]
    report = json.loads(out)
    assert report["skipped_too_large"] == 1 and report["documents_read"] == 1 and report["web"]["pages"] == 1
    assert report["bytes_read"] == _gunzipped_size(inp)  # what was read, not a declared length
    assert rss < OVER_CAP_BOUND, f"peak RSS {rss / MB:.0f} MB"
    _no_leftovers(tmp_path, inp)


def test_a_document_at_the_cap_stays_within_the_stated_bound(tmp_path, tok):
    """The stated bound for documents that are kept: ~100 MB + ~170 bytes per byte of the longest one."""
    cap = 1 * MB
    words = [f"plain words number {i % 97} for a small tokenizer." for i in range(cap // 48)]
    text = " ".join(words)[: cap - 20]
    inp = tmp_path / "at_cap.jsonl"
    inp.write_text(json.dumps({"text": text}) + "\n")
    rc, rss, out, err = _prepare(tmp_path, tok, inp, "--max-doc-bytes", str(cap))
    assert rc == 0, err[-2000:]
    assert json.loads(out)["documents_kept"] == 1
    assert rss < 100 * MB + 200 * cap, f"peak RSS {rss / MB:.0f} MB"
