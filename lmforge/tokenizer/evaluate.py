"""Tokenizer compression and round-trip exactness per input file."""

from __future__ import annotations

import os
from typing import Any

from lmforge.config import UserError
from lmforge.sources import ReadStats, iter_file_documents, resolve_inputs
from lmforge.tokenizer.core import Tokenizer, load_tokenizer


def evaluate_tokenizer(tokenizer, inputs: list[str] | str, text_field: str = "text", txt_mode: str = "file",
                       max_bytes_per_file: int | None = None, batch_docs: int = 256,
                       include: list[str] | str | None = None) -> dict[str, Any]:
    """Per resolved input file: documents, bytes, chars, tokens, bytes/token, chars/token and the share
    of documents with ``decode(encode(x)) == x``; plus the totals. ``tokenizer`` is a Tokenizer or a dir."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    files = []
    total = {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0, "exact": 0}
    for path in resolve_inputs(inputs, include=include):
        row = {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0, "exact": 0}
        batch: list[str] = []
        for doc in iter_file_documents(path, text_field, txt_mode, ReadStats()):
            if not doc:
                continue
            batch.append(doc)
            if len(batch) >= batch_docs:
                _measure(tok, batch, row)
            if max_bytes_per_file and row["bytes"] >= max_bytes_per_file:
                break
        _measure(tok, batch, row)
        for k in total:
            total[k] += row[k]
        files.append({"file": path, **_ratios(row)})
    if total["documents"] == 0:
        raise UserError(f"the inputs {inputs} hold no text to evaluate; check the paths and --text-field")
    return {"tokenizer": getattr(tok, "path", None), "hash": tok.hash, "vocab_size": tok.vocab_size,
            "files": files, "total": _ratios(total)}


def _measure(tok, batch: list[str], row: dict[str, int]) -> None:
    """Add a batch of documents to ``row`` and empty the batch."""
    for doc, ids in zip(batch, tok.encode_batch(batch)):
        row["documents"] += 1
        row["bytes"] += len(doc.encode("utf-8", errors="surrogatepass"))
        row["chars"] += len(doc)
        row["tokens"] += len(ids)
        row["exact"] += int(tok.decode(ids, skip_special_tokens=False) == doc)
    batch.clear()


def _ratios(row: dict[str, int]) -> dict[str, Any]:
    t = max(row["tokens"], 1)
    return {"documents": row["documents"], "bytes": row["bytes"], "chars": row["chars"], "tokens": row["tokens"],
            "bytes_per_token": round(row["bytes"] / t, 4), "chars_per_token": round(row["chars"] / t, 4),
            "round_trip_exact": round(row["exact"] / max(row["documents"], 1), 6)}


def short_name(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else os.path.basename(path)
