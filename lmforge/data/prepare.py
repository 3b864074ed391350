"""``prepare``: text -> cleaned, deduplicated, tokenized, EOS-joined token shards + ``index.json``.

Pipeline (streaming; memory does not grow with the corpus except the dedup tables, 8 bytes per kept
document for exact dedup and ~0.6 KB for near dedup):

1. inputs are resolved in a fixed order and cut into *tasks*: groups of small local files (the worker
   reads them) or batches of ~1 MB of documents streamed by the main process from big files, URLs,
   compressed files and datasets;
2. each task is cleaned and tokenized by ``process_task`` wherever the engine runs it (``engines.py``:
   in-process, a local process pool, or Ray tasks): PII scrubbing, empty / short removal,
   normalized-text hash, MinHash signature (``dedup="near"``), ``encode_batch``;
3. the main process takes results *in task order*, drops exact and near duplicates, assigns each
   document to train/val from (seed, text hash), and appends its tokens + EOS to the split's shard.

So shards are byte-identical whatever ``workers`` and the engine are, and dedup is corpus-wide. Memory is
bounded per document too: a document over ``max_doc_bytes`` (a ``.json`` file over ``max_file_bytes``) is
dropped while it is read and counted (``skipped_too_large``), and a worker reading a group of small files
gives up once they expand past ``FILES_TASK_TEXT`` (a small gzip can expand a thousandfold): the main
process then streams those files itself in ~1 MB tasks, at the same place in the order, so no task holds
more than about ``FILES_TASK_TEXT + max_doc_bytes`` of text. A truncated or corrupt input is an error
naming it, or with ``skip_bad_files`` is named in the report (``bad_files``). Output is built in a temp
dir beside ``out_dir`` and renamed into place at the end: a failed run leaves no half-written dir (an
``s3://``/``gs://`` ``out_dir`` is built locally, then uploaded, index.json last).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import __version__
from lmforge.atomic import make_temp_dir, swap_into_place
from lmforge.config import UserError
from lmforge.console import info
from lmforge.data import clean
from lmforge.data.doc_filters import FilterReport, FilterSpec, pipeline
from lmforge.data.engines import ENGINES, make_engine
from lmforge.data.holdout import hold_out_tail
from lmforge.data.remote import guard_remote_out, is_remote, upload_dir
from lmforge.data.shards import FORMAT, INDEX_NAME, dtype_for_vocab
from lmforge.interrupts import sigterm_raises
from lmforge.lock import acquire, output_lock_path
from lmforge.sources import (
    MAX_DOC_BYTES,
    MAX_FILE_BYTES,
    TXT_MODES,
    ReadStats,
    file_format,
    file_size,
    iter_file_documents,
    refuse_symlink_loop,
    resolve_inputs,
)
from lmforge.tokenizer.core import load_tokenizer

DEDUP_MODES = ("exact", "near", "none")
SMALL_FILE = 4 << 20  # local files up to this size are read by the workers themselves
TASK_BYTES = 1 << 20  # ~text per task
FILES_TASK_TEXT = 8 << 20  # a worker's group of small (compressed) files expanding past this is streamed


@dataclass
class TaskConfig:
    tokenizer_dir: str
    text_field: str = "text"
    txt_mode: str = "file"
    min_chars: int = 16
    pii: bool = False
    near: bool = False
    add_bos: bool = False
    filters: FilterSpec | None = None  # web filters (lmforge.data.doc_filters): language, quality, decontamination
    max_doc_bytes: int | None = MAX_DOC_BYTES  # longer documents are skipped while read (None: no cap)
    max_file_bytes: int | None = MAX_FILE_BYTES  # .json files (parsed whole) over this are skipped
    skip_bad_files: bool = False  # a truncated / corrupt file is named in the report instead of an error
    files_task_text: int = FILES_TASK_TEXT  # a group of small files holding more text is handed back

    def read(self, path: str, stats: ReadStats) -> Iterator[str]:
        return iter_file_documents(path, self.text_field, self.txt_mode, stats, self.max_doc_bytes,
                                   self.max_file_bytes, self.skip_bad_files)


@dataclass
class TaskResult:
    keys: list[int] = field(default_factory=list)  # normalized-text hash per kept document
    lengths: list[int] = field(default_factory=list)  # tokens per kept document (without EOS)
    tokens: np.ndarray | None = None  # all kept documents' tokens, concatenated
    sigs: np.ndarray | None = None  # (docs, num_perm) MinHash signatures
    removed_empty: int = 0
    removed_short: int = 0
    pii_emails: int = 0
    pii_phones: int = 0
    chars: int = 0
    stats: ReadStats = field(default_factory=ReadStats)
    filters: FilterReport | None = None  # counts of the web filters (doc_filters), when on
    redo: list[str] | None = None  # files that expanded past FILES_TASK_TEXT: the main process streams them


_WORKER: dict[str, Any] = {}


def _worker_state(cfg: TaskConfig) -> dict[str, Any]:
    if _WORKER.get("dir") != cfg.tokenizer_dir:
        _WORKER.clear()
        _WORKER.update(dir=cfg.tokenizer_dir, tok=load_tokenizer(cfg.tokenizer_dir),
                       minhash=clean.MinHasher())
    return _WORKER


def process_task(task: tuple[str, list[str]], cfg: TaskConfig) -> TaskResult:
    """Clean + hash + tokenize one task (runs in a worker process)."""
    state = _worker_state(cfg)
    tok, minhash = state["tok"], state["minhash"]
    res = TaskResult()
    kind, items = task
    if kind == "files":
        docs: list[str] = []
        held = 0
        for path in items:
            for doc in cfg.read(path, res.stats):
                docs.append(doc)
                held += len(doc)
                if held > cfg.files_task_text:  # compressed files that expand hugely: hand them back
                    return TaskResult(redo=list(items))
    else:
        docs = items
    kept: list[str] = []
    sigs = []
    filters = None
    if cfg.filters is not None:  # web filters: language, quality, decontamination (doc_filters.py)
        filters = pipeline(cfg.filters)
        res.filters = filters.new_report()
    for doc in docs:
        if cfg.pii:
            doc, ne, nph = clean.scrub_pii(doc)
            res.pii_emails += ne
            res.pii_phones += nph
        if not doc.strip():
            res.removed_empty += 1
            continue
        if len(doc) < cfg.min_chars:
            res.removed_short += 1
            continue
        if filters is not None:
            doc = filters.apply(doc, res.filters)
            if doc is None:
                continue
        norm = clean.normalize(doc)
        res.keys.append(clean.text_key(norm))
        if cfg.near:
            sigs.append(minhash.signature(norm))
        res.chars += len(doc)
        kept.append(doc)
    ids = tok.encode_batch(kept, add_bos=cfg.add_bos) if kept else []
    res.lengths = [len(x) for x in ids]
    if ids:
        res.tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32, count=sum(res.lengths))
    if cfg.near and sigs:
        res.sigs = np.stack(sigs)
    return res


class _ShardWriter:
    """Appends tokens to ``{split}_{i:05d}.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: str, shard_tokens: int):
        self.dir, self.split, self.dtype, self.cap = directory, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.f = None
        self.h = None
        self.n = 0
        self.docs = 0
        self.total_docs = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.f = open(self.dir / name, "wb")
        self.h = hashlib.sha256()
        self.n, self.docs = 0, 0
        self.shards.append({"file": name, "tokens": 0, "documents": 0, "sha256": ""})

    def _close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.shards[-1].update(tokens=self.n, documents=self.docs, sha256=self.h.hexdigest())
            self.f = None

    def write(self, tokens: np.ndarray, docs_ending: int) -> None:
        arr = tokens.astype(self.dtype, copy=False)
        while len(arr):
            if self.f is None or self.n >= self.cap:
                self._close()
                self._open()
            take = min(len(arr), self.cap - self.n)
            blob = arr[:take].tobytes()
            self.f.write(blob)
            self.h.update(blob)
            self.n += take
            arr = arr[take:]
        self.docs += docs_ending
        self.total_docs += docs_ending

    def finish(self) -> dict[str, Any]:
        self._close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.total_docs,
                "shards": self.shards}


def _tasks(paths: list[str], cfg: TaskConfig, stats: ReadStats) -> Iterator[tuple[str, list[str]]]:
    """Cut the inputs into ordered tasks of about TASK_BYTES."""
    group: list[str] = []
    group_bytes = 0
    for path in paths:
        size = file_size(path)
        fmt = file_format(path)
        if size is not None and size <= SMALL_FILE and fmt != "parquet":
            group.append(path)
            group_bytes += size
            if group_bytes >= TASK_BYTES:
                yield "files", group
                group, group_bytes = [], 0
            continue
        if group:
            yield "files", group
            group, group_bytes = [], 0
        yield from _doc_tasks(path, cfg, stats)
    if group:
        yield "files", group


def _doc_tasks(path: str, cfg: TaskConfig, stats: ReadStats) -> Iterator[tuple[str, list[str]]]:
    """One file read here (the main process) and cut into tasks of ~TASK_BYTES of documents."""
    batch: list[str] = []
    batch_bytes = 0
    for doc in cfg.read(path, stats):
        batch.append(doc)
        batch_bytes += len(doc)
        if batch_bytes >= TASK_BYTES:
            yield "docs", batch
            batch, batch_bytes = [], 0
    if batch:
        yield "docs", batch


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        line = (f"prepare: {docs:,} docs | {tokens:,} tokens | {nbytes / 1e6:,.1f} MB | "
                f"{nbytes / 1e6 / dt:.2f} MB/s | {tokens / dt:,.0f} tok/s")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            info(line)


def _nothing_read(n_paths: int, stats: ReadStats, max_doc_bytes: int, max_file_bytes: int) -> str:
    """Why no document at all came out of the inputs: every one was too large, or every file was bad."""
    parts = []
    if stats.too_large:
        parts.append(f"all {stats.too_large:,} document(s) were over --max-doc-bytes={max_doc_bytes:,}"
                     + (f" (or, for .json files, over --max-file-bytes={max_file_bytes:,})"
                        if max_file_bytes else "") + " and were skipped (read and dropped, never held whole)")
    if stats.bad_files:
        parts.append(f"{len(stats.bad_files)} truncated or corrupt file(s) were skipped (--skip-bad-files: "
                     + ", ".join(Path(f).name for f, _ in stats.bad_files[:3]) + ")")
    fix = "raise --max-doc-bytes (0: no cap) to keep them" if stats.too_large else "repair the inputs"
    return f"no text left to write from {n_paths} input file(s): " + "; ".join(parts) + f"; {fix}"


def _refuse_existing(out: Path, out_dir: str | os.PathLike, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output '{out_dir}' already exists; pass --overwrite or choose another --out")


# A SIGTERM unwinds through the cleanup below (the temp dir is removed; exit 143): the guard decorates the
# function, so its signature is the real one (no *args/**kwargs pass-through).
@sigterm_raises("error: terminated (SIGTERM); no output written")
def prepare(inputs: list[str] | str, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
            val_fraction: float = 0.0, workers: int = 1, dedup: str = "exact", seed: int = 0,
            text_field: str = "text", min_chars: int = 16, txt_mode: str = "file", pii: bool = False,
            shard_tokens: int = 1 << 28, add_bos: bool = False, near_threshold: float = 0.8,
            overwrite: bool = False, progress: bool = True,
            include: list[str] | str | None = None, filters: FilterSpec | None = None,
            engine: str = "local", ray_address: str | None = None, max_doc_bytes: int = MAX_DOC_BYTES,
            max_file_bytes: int = MAX_FILE_BYTES, skip_bad_files: bool = False) -> dict[str, Any]:
    """Tokenize ``inputs`` into a token-shard dir at ``out_dir``; returns the report (also in index.json).

    ``txt_mode``: ``file`` (one document per text file, e.g. source code), ``blank`` (blank-line-separated
    blocks) or ``line``. ``dedup``: ``exact`` (normalized-text hash), ``near`` (exact + MinHash LSH at
    ``near_threshold`` estimated Jaccard over character 5-grams) or ``none``. ``pii`` replaces e-mail
    addresses and phone numbers with ``[EMAIL]`` / ``[PHONE]``. ``include`` (``["*.py"]``) picks the files
    read inside input directories (default: txt, text, md, py, json, jsonl, ndjson, parquet, warc, wet,
    html, htm). ``filters`` (:func:`lmforge.data.doc_filters.make_spec`): language routing, quality filters
    and decontamination per document, counted in the report's ``filters``.
    ``engine``: where the tasks run, ``local`` (``workers`` processes here) or ``ray`` (Ray tasks on a local
    cluster, or the one at ``ray_address``); the shards are byte-identical either way. ``out_dir`` may be an
    ``s3://``/``gs://`` URL: the dir is built locally, then uploaded with ``index.json`` last.
    ``max_doc_bytes`` (0: no cap): documents longer than this many (decompressed) bytes are skipped while
    read and counted in ``skipped_too_large``; ``max_file_bytes`` (0: no cap) the same for ``.json`` files,
    which are parsed whole. A truncated or corrupt input file is a UserError naming it; with
    ``skip_bad_files`` it is named in the report's ``bad_files`` and the run goes on.
    """
    t0 = time.perf_counter()
    if dedup not in DEDUP_MODES:
        raise UserError(f"--dedup={dedup!r} is not one of {', '.join(DEDUP_MODES)}")
    if txt_mode not in TXT_MODES:
        raise UserError(f"--txt-mode={txt_mode!r} is not one of {', '.join(TXT_MODES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if workers < 1:
        raise UserError(f"--workers={workers} must be at least 1")
    if engine not in ENGINES:
        raise UserError(f"--engine={engine!r} is not one of {', '.join(ENGINES)}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens={shard_tokens} must be positive")
    if min_chars < 0:
        raise UserError(f"--min-chars={min_chars} must be >= 0")
    for flag, value in (("--max-doc-bytes", max_doc_bytes), ("--max-file-bytes", max_file_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{flag}={value!r} must be a whole number of bytes >= 0 (0: no cap)")
    refuse_symlink_loop(out_dir, "--out")
    remote_out = is_remote(out_dir)  # built in a local staging dir, then uploaded, index.json last
    if remote_out:
        guard_remote_out(str(out_dir), [str(i) for i in ([inputs] if isinstance(inputs, str) else inputs)],
                         overwrite)
    out = Path(out_dir)
    if not remote_out:
        _refuse_existing(out, out_dir, overwrite)
    tokenizer_dir = str(Path(tokenizer_dir).expanduser().resolve())
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_id is None:
        raise UserError(f"tokenizer '{tokenizer_dir}' has no EOS token to separate documents")
    if add_bos and tok.bos_id is None:
        raise UserError(f"tokenizer '{tokenizer_dir}' has no BOS token; drop --add-bos")
    dtype = dtype_for_vocab(tok.vocab_size)
    stats = ReadStats()
    paths = resolve_inputs(inputs, stats, include)
    cfg = TaskConfig(tokenizer_dir, text_field, txt_mode, min_chars, pii, dedup == "near", add_bos,
                     filters=filters, max_doc_bytes=max_doc_bytes or None, max_file_bytes=max_file_bytes or None,
                     skip_bad_files=skip_bad_files, files_task_text=FILES_TASK_TEXT)

    staging = Path(tempfile.mkdtemp(prefix="lmforge-prepare-")) if remote_out else None
    if staging is not None:
        out = staging / "out"
    runner = tmp = lock = None
    try:
        if not remote_out:  # one prepare writes `out` at a time (lmforge.lock); the rename re-checks atomically
            lock = acquire(output_lock_path(out), "lmforge prepare", f"--out '{out_dir}'", "choose another --out")
            _refuse_existing(out, out_dir, overwrite)  # a prepare that held the lock may have finished
        tmp = make_temp_dir(out)  # filled, then renamed to `out` only when complete
        runner = make_engine(engine, workers, ray_address)
        writers = {"train": _ShardWriter(tmp, "train", dtype, shard_tokens),
                   "val": _ShardWriter(tmp, "val", dtype, shard_tokens)}
        eos = np.array([tok.eos_id], dtype=np.uint32)
        seen: set[int] = set()
        near = clean.NearDedup(threshold=near_threshold) if dedup == "near" else None
        counts = collections.Counter()
        filter_report = FilterReport()  # web filters' counts, merged in task order
        bar = _Progress(progress)

        def consume(res: TaskResult) -> None:
            stats.add(res.stats)
            filter_report.merge(res.filters)
            for k in ("removed_empty", "removed_short", "pii_emails", "pii_phones"):
                counts[k] += getattr(res, k)
            offset = 0
            pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            ndocs = {"train": 0, "val": 0}
            for i, (key, n) in enumerate(zip(res.keys, res.lengths)):
                doc_tokens = res.tokens[offset:offset + n]
                offset += n
                if dedup != "none":
                    if key in seen:
                        counts["removed_exact_duplicates"] += 1
                        continue
                    seen.add(key)
                    if near is not None and near.seen(res.sigs[i]):
                        counts["removed_near_duplicates"] += 1
                        continue
                split = "val" if clean.is_val(key, seed, val_fraction) else "train"
                pieces[split] += [doc_tokens, eos]
                ndocs[split] += 1
            for split, arrs in pieces.items():
                if arrs:
                    writers[split].write(np.concatenate(arrs), ndocs[split])
            counts["read_chars"] += res.chars
            docs = writers["train"].total_docs + writers["val"].total_docs
            toks = sum(w.n + sum(s["tokens"] for s in w.shards[:-1]) for w in writers.values() if w.shards)
            bar.update(docs, toks, stats.bytes)

        for res in runner.map_ordered(process_task, _tasks(paths, cfg, stats), cfg):
            if res.redo:  # small files that expanded past FILES_TASK_TEXT: streamed here, in their place
                for path in res.redo:
                    for task in _doc_tasks(path, cfg, stats):
                        consume(process_task(task, cfg))
                continue
            consume(res)
        runner.close()
        ran_on = runner.describe()
        runner = None

        splits = {name: w.finish() for name, w in writers.items()}
        for name in list(splits):
            if not splits[name]["shards"]:
                splits[name]["shards"] = []
        held_out = 0  # too few documents to hold whole ones out: hold out the tail tokens (data/holdout.py)
        if val_fraction > 0 and (splits["val"]["documents"] == 0 or splits["train"]["documents"] == 0):
            held_out = hold_out_tail(tmp, splits, val_fraction, dtype, tok.eos_id)
        n_docs = splits["train"]["documents"] + splits["val"]["documents"]
        if n_docs == 0 and held_out == 0 and stats.documents == 0 and (stats.too_large or stats.bad_files):
            any_json = any(file_format(p) == "json" for p in paths)
            raise UserError(_nothing_read(len(paths), stats, max_doc_bytes, max_file_bytes if any_json else 0))
        if n_docs == 0 and held_out == 0:
            raise UserError(f"no text left to write from {len(paths)} input file(s): "
                            f"{stats.documents} documents read, {counts['removed_empty']} empty, "
                            f"{counts['removed_short']} shorter than --min-chars={min_chars}, "
                            f"{counts['removed_exact_duplicates']} duplicates"
                            + (f", {stats.too_large} over --max-doc-bytes={max_doc_bytes} (skipped)"
                               if stats.too_large else "")
                            + (f", {len(stats.bad_files)} bad file(s) skipped" if stats.bad_files else "")
                            + (f", {filter_report.documents_in - filter_report.documents_out} removed by the "
                               "language/quality/decontamination filters (see --lang, --quality)"
                               if filters is not None else "")
                            + "; check the inputs and --text-field")
        if splits["train"]["tokens"] == 0:
            raise UserError(f"every document went to the val split (--val-fraction={val_fraction}); lower it")
        seconds = time.perf_counter() - t0
        tokens_total = splits["train"]["tokens"] + splits["val"]["tokens"]
        report: dict[str, Any] = {
            "files": stats.files, "skipped_files": stats.skipped_files, "skipped": stats.skipped[:20],
            "documents_read": stats.documents, "skipped_too_large": stats.too_large,
            "bad_files": [{"file": f, "error": why} for f, why in stats.bad_files],
            "bytes_read": stats.bytes, "invalid_utf8_documents": stats.invalid_utf8_documents,
            "replaced_chars": stats.replaced_chars, "removed_empty": counts["removed_empty"],
            "removed_short": counts["removed_short"],
            "removed_exact_duplicates": counts["removed_exact_duplicates"],
            "removed_near_duplicates": counts["removed_near_duplicates"],
            "pii_emails": counts["pii_emails"], "pii_phones": counts["pii_phones"],
            "documents_kept": n_docs, "train_documents": splits["train"]["documents"],
            "val_documents": splits["val"]["documents"], "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"], "tokens": tokens_total,
            "seconds": round(seconds, 3), "mb_per_s": round(stats.bytes / 1e6 / max(seconds, 1e-9), 3),
            "tokens_per_s": round(tokens_total / max(seconds, 1e-9), 1),
            "chars_per_token": round(counts["read_chars"] / max(tokens_total - n_docs, 1), 4),
        }
        if filters is not None:
            report["filters"] = filter_report.as_dict(filters)
        if stats.web_pages or stats.web_skipped_records:
            report["web"] = {"pages": stats.web_pages, "skipped_records": stats.web_skipped_records,
                             "no_main_text": stats.web_no_main_text}
        if stats.replaced_chars:
            share = stats.replaced_chars / max(counts["read_chars"], 1)
            report["encoding_warning"] = (
                f"{stats.replaced_chars:,} characters in {stats.invalid_utf8_documents:,} documents were not valid "
                f"UTF-8 and were replaced with U+FFFD ({share:.1%} of the text); binary or non-UTF-8 input? "
                "check the inputs (--include narrows what is read inside dirs)")
            info("warning: " + report["encoding_warning"])
        if stats.skipped:
            names = ", ".join(Path(n).name for n in stats.skipped[:5]) + (" …" if len(stats.skipped) > 5 else "")
            info(f"prepare: skipped {len(stats.skipped)} file(s) in input directories that are not text data "
                 f"({names}); name them with --include to read them")
        if stats.too_large:
            info(f"prepare: skipped {stats.too_large:,} document(s) over --max-doc-bytes={max_doc_bytes:,}"
                 + (f" (or .json files over --max-file-bytes={max_file_bytes:,})"
                    if max_file_bytes and any(file_format(p) == "json" for p in paths) else "")
                 + " without holding them whole; raise the cap to keep them")
        if stats.bad_files:
            names = ", ".join(Path(f).name for f, _ in stats.bad_files[:5]) + (
                " …" if len(stats.bad_files) > 5 else "")
            info(f"warning: skipped {len(stats.bad_files)} truncated or corrupt file(s) (--skip-bad-files): {names}"
                 "; the report's bad_files says why")
        if held_out:
            report["val_held_out_tokens"] = held_out
            info(f"prepare: {n_docs} document(s) are too few to hold out whole ones for --val-fraction="
                 f"{val_fraction}; the last {held_out:,} tokens are the val split instead")
        if val_fraction > 0 and splits["val"]["tokens"] == 0:
            report["warning"] = (f"--val-fraction={val_fraction} put no document in val "
                                 f"({n_docs} documents kept); use more documents or a larger fraction")
            info("warning: " + report["warning"])
        index = {
            "format": FORMAT, "version": 1,
            "tokenizer": {"hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                          "bos_id": tok.bos_id, "pad_id": tok.pad_id, "path": tokenizer_dir},
            "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "dtype": dtype,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id if add_bos else None,
            "splits": splits,
            "cleaning": report,
            "config": {"inputs": [str(i) for i in ([inputs] if isinstance(inputs, str) else inputs)],
                       "val_fraction": val_fraction, "dedup": dedup, "seed": seed, "text_field": text_field,
                       "txt_mode": txt_mode, "min_chars": min_chars, "pii": pii, "add_bos": add_bos,
                       "near_threshold": near_threshold, "shard_tokens": shard_tokens, **ran_on,
                       "include": include, "filters": filters.as_dict() if filters is not None else None,
                       "max_doc_bytes": max_doc_bytes, "max_file_bytes": max_file_bytes,
                       "skip_bad_files": skip_bad_files},
            "lmforge_version": __version__,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, ensure_ascii=False))
        bar.update(n_docs, tokens_total, stats.bytes, final=True)
        swap_into_place(tmp, out, overwrite=overwrite or remote_out)
        if remote_out:
            upload_dir(out, str(out_dir), overwrite)
        return report
    except BaseException:
        if runner is not None:
            runner.close(failed=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
