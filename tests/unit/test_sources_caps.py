"""Per-document byte caps while reading, truncated / corrupt archives and bytes counted from what was read
(issue 22: "Memory is unbounded per document", "Honest data handling")."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma

import pytest

from lmforge.config import UserError
from lmforge.sources import BadInputFile, ReadStats, iter_documents, iter_file_documents

CAP = 1000
SHORT = [f"a short document number {i} with some words" for i in range(5)]
LONG = "x" * (3 << 20)  # longer than the cap and than one 1 MiB read chunk: dropped across chunk boundaries


def _compress(data: bytes, suffix: str) -> bytes:
    import zstandard

    return {"": lambda d: d, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda d: zstandard.ZstdCompressor().compress(d)}[suffix](data)


def _read(path, **kw):
    stats = ReadStats()
    docs = list(iter_file_documents(str(path), stats=stats, **kw))
    return docs, stats


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".bz2", ".xz"])
def test_jsonl_line_over_the_cap_is_skipped_counted_and_its_bytes_read(tmp_path, suffix):
    lines = [json.dumps({"text": t}) for t in (SHORT[0], LONG, SHORT[1], "y" * (CAP + 1), SHORT[2])]
    raw = ("\n".join(lines) + "\n").encode()
    path = tmp_path / f"d.jsonl{suffix}"
    path.write_bytes(_compress(raw, suffix))
    docs, stats = _read(path, max_doc_bytes=CAP)
    assert docs == SHORT[:3] and stats.too_large == 2 and stats.documents == 3
    assert stats.bytes == len(raw)  # decompressed bytes actually read, dropped ones included
    docs, stats = _read(path)  # no cap: everything (what the other commands read)
    assert len(docs) == 5 and stats.too_large == 0


def test_a_line_exactly_at_the_cap_is_kept_and_one_byte_more_is_not(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"a" * CAP + b"\n" + b"b" * (CAP + 1) + b"\r\nlast line without newline")
    docs, stats = _read(p, txt_mode="line", max_doc_bytes=CAP)
    assert docs == ["a" * CAP, "last line without newline"] and stats.too_large == 1


@pytest.mark.parametrize("mode, expect", [
    ("line", (["one", "two", "four"], 1)),
    ("blank", (["one\r\ntwo", "four"], 1)),
])
def test_text_line_and_blank_modes(tmp_path, mode, expect):
    p = tmp_path / "t.txt.gz"
    p.write_bytes(gzip.compress(b"one\r\ntwo\n\n" + LONG.encode() + b"\n\nfour\n"))
    docs, stats = _read(p, txt_mode=mode, max_doc_bytes=CAP)
    assert (docs, stats.too_large) == expect


def test_blank_mode_block_over_the_cap_of_short_lines_is_dropped_whole(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("kept block\nof two lines\n\n" + "short line\n" * 200 + "\nlast block\n")
    docs, stats = _read(p, txt_mode="blank", max_doc_bytes=CAP)
    assert docs == ["kept block\nof two lines", "last block"] and stats.too_large == 1


def test_text_file_mode_and_html_file_over_the_cap(tmp_path):
    (tmp_path / "big.txt.xz").write_bytes(lzma.compress(LONG.encode()))
    (tmp_path / "small.txt").write_text(SHORT[0])
    (tmp_path / "big.html").write_text("<html><body><p>" + "word " * 1000 + "</p></body></html>")
    stats = ReadStats()
    docs = list(iter_documents([str(tmp_path)], stats=stats, max_doc_bytes=CAP))
    assert docs == [SHORT[0]] and stats.too_large == 2
    assert stats.bytes == len(LONG) + len(SHORT[0]) + (tmp_path / "big.html").stat().st_size


def test_json_file_cap_and_per_element_cap(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": SHORT[0]}, {"text": "z" * (CAP + 5)}, {"text": SHORT[1]}]))
    docs, stats = _read(p, max_doc_bytes=CAP)
    assert docs == SHORT[:2] and stats.too_large == 1
    docs, stats = _read(p, max_file_bytes=100)  # parsed whole: the file itself is over its cap
    assert docs == [] and stats.too_large == 1 and stats.bytes == p.stat().st_size


def test_parquet_cell_over_the_cap(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [SHORT[0], "q" * (CAP + 1), None, SHORT[1]]}), p)
    docs, stats = _read(p, max_doc_bytes=CAP)
    assert docs == [SHORT[0], "", SHORT[1]] and stats.too_large == 1


def test_multibyte_text_is_measured_in_utf8_bytes(tmp_path):
    p = tmp_path / "zh.jsonl"
    p.write_text(json.dumps({"text": "中" * 400}, ensure_ascii=False) + "\n", encoding="utf-8")
    docs, stats = _read(p, max_doc_bytes=CAP)  # 1,200 bytes of text in a line of ~1,212
    assert docs == [] and stats.too_large == 1


def test_zstd_multi_frame_reads_whole_and_a_bomb_is_read_and_dropped(tmp_path):
    import zstandard

    p = tmp_path / "m.txt.zst"
    c = zstandard.ZstdCompressor()
    p.write_bytes(c.compress(b"first frame\n") + c.compress(b"second frame\n"))
    assert _read(p, txt_mode="line")[0] == ["first frame", "second frame"]
    bomb = tmp_path / "bomb.jsonl.zst"
    bomb.write_bytes(c.compress(b'{"text": "' + b"a" * (64 << 20) + b'"}\n'))
    assert bomb.stat().st_size < 100_000
    docs, stats = _read(bomb, max_doc_bytes=CAP)
    assert docs == [] and stats.too_large == 1 and stats.bytes == (64 << 20) + 13


# ---- truncated and corrupt archives: one rule for every format --------------------------------------

def _truncated(tmp_path, suffix):
    import zstandard

    raw = "".join(json.dumps({"text": f"{SHORT[i % 5]} {i}"}) + "\n" for i in range(3000)).encode()
    name = f"cut.jsonl{suffix}"
    if suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(raw)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.table({"text": [f"{SHORT[i % 5]} {i}" for i in range(3000)]}), buf)
        data, name = buf.getvalue(), "cut.parquet"
    elif suffix == ".warc.gz":
        from tests.unit.test_web_inputs import _warc

        _warc(tmp_path / "w.warc.gz", [(f"https://x.example/{i}", "text/plain", f"page {i} ".encode() * 50)
                                       for i in range(50)])
        data, name = (tmp_path / "w.warc.gz").read_bytes(), "cut.warc.gz"
        (tmp_path / "w.warc.gz").unlink()
    else:
        data = _compress(raw, suffix)
    path = tmp_path / name
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz", ".warc.gz", ".parquet"])
def test_a_truncated_file_is_an_error_naming_it_or_skipped_and_named(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    bad = _truncated(tmp_path, suffix)
    good = tmp_path / "good.txt"
    good.write_text(SHORT[0])
    with pytest.raises(BadInputFile) as e:
        list(iter_documents([str(bad), str(good)]))
    msg = str(e.value)
    assert str(bad) in msg and "--skip-bad-files" in msg and "\n" not in msg and isinstance(e.value, UserError)
    stats = ReadStats()
    docs = list(iter_documents([str(bad), str(good)], stats=stats, skip_bad_files=True))
    assert docs[-1] == SHORT[0] and [f for f, _ in stats.bad_files] == [str(bad)]
    assert str(bad) in stats.bad_files[0][1]


@pytest.mark.parametrize("name, data", [
    ("garbage.jsonl.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 200),  # gzip header, corrupt deflate (zlib.error)
    ("garbage.txt.xz", b"\xfd7zXZ\x00" + b"\x00" * 100),  # xz header, corrupt stream (LZMAError)
    ("garbage.txt.bz2", b"BZh9" + b"\x00" * 100),
    ("garbage.txt.zst", b"\x28\xb5\x2f\xfd" + b"\xff" * 100),
    ("bad.json", b'[{"text": "cut off'),
])
def test_corrupt_files_are_bad_input_files(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(BadInputFile, match=name.replace(".", r"\.")):
        list(iter_file_documents(str(tmp_path / name), txt_mode="line"))
    stats = ReadStats()
    assert list(iter_file_documents(str(tmp_path / name), stats=stats, skip_bad_files=True)) == []
    assert len(stats.bad_files) == 1


def test_bad_input_file_survives_pickling_for_worker_processes():
    import pickle

    e = pickle.loads(pickle.dumps(BadInputFile("/x/y.gz", "input '/x/y.gz' cannot be read: cut")))
    assert e.path == "/x/y.gz" and str(e).startswith("input '/x/y.gz' cannot be read: cut; fix or remove")


# ---- WARC: bytes actually read, a declared length beyond the data, records over the cap ------------

def _record(body: bytes, declared: int | None = None, ctype: bytes = b"text/html") -> bytes:
    block = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\n\r\n" + body
    return (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000001>\r\n"
            b"WARC-Target-URI: https://x.example/\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
            b"Content-Type: application/http; msgtype=response\r\nContent-Length: "
            + str(len(block) if declared is None else declared).encode() + b"\r\n\r\n" + block + b"\r\n\r\n")


def test_warc_content_length_of_10_15_is_a_truncated_file_not_bytes_read(tmp_path):
    good = _record(b"<html><body><p>" + b"A sentence of the page. " * 40 + b"</p></body></html>",
                   ctype=b"text/plain")
    p = tmp_path / "lie.warc"
    p.write_bytes(good + _record(b"tiny", declared=10**15))
    stats = ReadStats()
    with pytest.raises(BadInputFile, match=r"lie\.warc.*Content-Length 1000000000000000.*truncated"):
        list(iter_file_documents(str(p), stats=stats))
    assert stats.bytes <= p.stat().st_size
    stats = ReadStats()
    docs = list(iter_file_documents(str(p), stats=stats, skip_bad_files=True))
    assert len(docs) == 1 and len(stats.bad_files) == 1 and stats.bytes <= p.stat().st_size


def test_warc_record_over_the_cap_is_counted_and_the_next_one_read(tmp_path):
    p = tmp_path / "big.warc.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(_record(b"<html><body><p>" + b"word " * 600_000 + b"</p></body></html>"))
        f.write(_record(b"A plain text page that is kept.", ctype=b"text/plain"))
    stats = ReadStats()
    docs = list(iter_file_documents(str(p), stats=stats, max_doc_bytes=CAP))
    assert docs == ["A plain text page that is kept."]
    assert stats.too_large == 1 and stats.web_pages == 1
    assert stats.bytes == len(gzip.decompress(p.read_bytes()))


# ---- prepare: the report, and what it says when everything was too large ----------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory, make_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d, [f"plain words number {i} for a small tokenizer." for i in range(200)], vocab_size=300)
    return d / "out"


def test_prepare_counts_too_large_and_bad_files_in_the_report(tmp_path, tok):
    from lmforge.data.prepare import prepare

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "d.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in [*SHORT, LONG]).encode()))
    bad = _truncated(inp, ".gz")
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz' cannot be read: it is truncated"):
        prepare([str(inp)], tok, tmp_path / "out", progress=False, max_doc_bytes=CAP)
    assert not (tmp_path / "out").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["in"]
    r = prepare([str(inp)], tok, tmp_path / "out", progress=False, max_doc_bytes=CAP, skip_bad_files=True)
    assert r["skipped_too_large"] == 1 and r["bad_files"][0]["file"] == str(bad)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["config"]["max_doc_bytes"] == CAP and index["cleaning"]["skipped_too_large"] == 1
    with pytest.raises(UserError, match="--max-doc-bytes=-1 must be"):
        prepare([str(inp)], tok, tmp_path / "o2", progress=False, max_doc_bytes=-1)


def test_prepare_says_every_document_was_too_large_not_check_text_field(tmp_path, tok):
    from lmforge.data.prepare import prepare

    (tmp_path / "one.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": LONG}) + "\n").encode() * 2))
    with pytest.raises(UserError) as e:
        prepare([str(tmp_path / "one.jsonl.gz")], tok, tmp_path / "out", progress=False, max_doc_bytes=CAP)
    msg = str(e.value)
    assert "all 2 document(s) were over --max-doc-bytes=1,000" in msg and "--text-field" not in msg, msg
    assert not (tmp_path / "out").exists()
    r = prepare([str(tmp_path / "one.jsonl.gz")], tok, tmp_path / "out", progress=False, max_doc_bytes=0)
    assert r["documents_read"] == 2 and r["skipped_too_large"] == 0  # 0: no cap


def test_every_cut_of_a_warc_gz_is_an_error_unless_it_falls_between_records(tmp_path):
    """warcio takes an EOFError from a cut gzip for the end of the archive: before, most cuts of a .warc.gz
    were read as a shorter archive without a word (exit 0). Only a cut between two records' gzip members,
    which leaves a valid shorter archive, can pass."""
    from tests.unit.test_web_inputs import _warc

    whole = tmp_path / "w.warc.gz"
    _warc(whole, [(f"https://x.example/{i}", "text/plain", f"page {i} ".encode() * 50) for i in range(12)])
    data = whole.read_bytes()
    cut = tmp_path / "cut.warc.gz"
    silent = []
    for n in range(1, len(data), 7):
        cut.write_bytes(data[:n])
        try:
            list(iter_file_documents(str(cut)))
        except BadInputFile as e:
            assert "cut.warc.gz" in str(e)
            continue
        gzip.decompress(data[:n])  # passed: must be a whole number of gzip members (records)
        silent.append(n)
    assert len(silent) <= 12, silent


def test_small_compressed_files_that_expand_hugely_are_streamed_by_the_main_process(tmp_path, tok, monkeypatch):
    """A worker's group of small files gives up past FILES_TASK_TEXT; the main process streams the group in
    its place, so the shards are the same as when the limit is not reached."""
    from lmforge.data import prepare as prep

    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        (inp / f"f{i}.jsonl.gz").write_bytes(gzip.compress("".join(
            json.dumps({"text": f"{SHORT[j % 5]} file {i} line {j}"}) + "\n" for j in range(300)).encode()))
    whole = prep.prepare([str(inp)], tok, tmp_path / "a", progress=False)
    calls = []
    real = prep._doc_tasks
    monkeypatch.setattr(prep, "_doc_tasks", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(prep, "FILES_TASK_TEXT", 5_000)
    redone = prep.prepare([str(inp)], tok, tmp_path / "b", progress=False)
    assert calls == [str(p) for p in sorted(inp.iterdir())]  # the whole group, in order
    for k in ("documents_read", "files", "bytes_read", "tokens", "documents_kept"):
        assert redone[k] == whole[k], k
    assert (tmp_path / "a" / "train_00000.bin").read_bytes() == (tmp_path / "b" / "train_00000.bin").read_bytes()


def test_cli_truncated_warc_beside_a_good_file_is_one_line_or_skipped_and_named(tmp_path, tok, capsys):
    """Before: a cut .warc.gz passed with a good file was dropped without a word (exit 0)."""
    from lmforge.cli import main

    bad = _truncated(tmp_path, ".warc.gz")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"{s} kept"}) + "\n" for s in SHORT))
    argv = ["prepare", "--input", str(bad), str(good), "--tokenizer", str(tok), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cut.warc.gz" in err[0] and "--skip-bad-files" in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "o").exists()
    assert main([*argv, "--skip-bad-files", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert [b["file"] for b in report["bad_files"]] == [str(bad)]
    assert report["documents_kept"] > 5  # the good file, and the pages before the cut (kept, as documented)
    assert "skipped 1 truncated or corrupt file(s) (--skip-bad-files): cut.warc.gz" in captured.err


def test_warc_endless_header_line_is_refused_not_held(tmp_path):
    """warcio reads a record's headers line by line into memory; a header block past 1 MiB is a bad file."""
    p = tmp_path / "hdr.warc.gz"
    with gzip.open(p, "wb", compresslevel=1) as f:
        f.write(_record(b"A plain text page that is kept.", ctype=b"text/plain"))
        f.write(b"WARC/1.0\r\nWARC-Type: response\r\nX-Junk: ")
        for _ in range(40):
            f.write(b"j" * (1 << 20))
    stats = ReadStats()
    with pytest.raises(BadInputFile, match=r"hdr\.warc\.gz.*headers run past 1,048,576 bytes"):
        list(iter_file_documents(str(p), stats=stats))
    assert stats.bytes < 3 << 20  # stopped soon after the limit, not at the end of the 40 MB line
