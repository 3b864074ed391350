"""Initialize token embeddings from pretrained word vectors (word2vec / GloVe / fastText text format).

``init_embeddings_from(model, tokenizer, path)`` gives every token that spells a word in the vector file
(exact match first, then lower-cased) that word's vector, projected to the model's width when the
dimensions differ and scaled to the embedding's own standard deviation; other rows keep their random
init. It returns a coverage report. A tied LM head shares the matrix, so it is initialized too.

File formats: one ``word v1 … vD`` per line (GloVe), optionally after a ``COUNT DIM`` header line
(word2vec ``.txt`` / fastText ``.vec``); ``.gz`` files are read as gzip. Words may contain spaces (the last
D fields are the vector).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.config import UserError

# Markers subword vocabularies put on word-initial pieces (byte-level BPE, SentencePiece).
_PREFIXES = ("Ġ", "▁")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_word_vectors(path: str | os.PathLike) -> Iterator[tuple[str, list[str]]]:
    """Yield (word, vector fields) from a text-format vector file; validates the dimension on every line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"word-vector file '{path}' does not exist; pass a word2vec/GloVe/fastText .txt/.vec file")
    dim = None
    with _open_text(p) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n\r").rstrip(" ").split(" ")
            if lineno == 1 and len(parts) == 2 and all(x.isdigit() for x in parts):
                dim = int(parts[1])  # word2vec / fastText header: COUNT DIM
                continue
            if len(parts) < 2:
                continue
            if dim is None:
                dim = _guess_dim(parts)
            if len(parts) < dim + 1:
                raise UserError(f"{path}:{lineno}: expected a word and {dim} numbers, got {len(parts)} fields; "
                                "is this a text-format (not binary) vector file?")
            yield " ".join(parts[:-dim]), parts[-dim:]


def _guess_dim(parts: list[str]) -> int:
    """GloVe has no header: the vector is the trailing run of numbers (words may contain spaces)."""
    n = 0
    for x in reversed(parts):
        try:
            float(x)
        except ValueError:
            break
        n += 1
    if n == len(parts):
        n -= 1  # a numeric word ("1999 0.1 0.2 …")
    if n <= 0:
        raise UserError(f"cannot read a vector from the line starting {' '.join(parts[:3])!r}; expected "
                        "'word v1 v2 …'")
    return n


def token_surfaces(tokenizer) -> list[str | None]:
    """id → the text a token spells as a word (None for special tokens, word-internal pieces, partial bytes)."""
    specials = set(getattr(tokenizer, "special_tokens", {}) or {})
    out: list[str | None] = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_token(i)
        if piece is None or piece in specials or piece.startswith("##"):
            out.append(None)
            continue
        text = tokenizer.decode([i], skip_special_tokens=False)
        text = text.strip()
        if not text or "\ufffd" in text:
            out.append(None)
            continue
        out.append(text)
    return out


def match_vectors(surfaces: list[str | None], path: str | os.PathLike
                  ) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Stream the vector file once, keeping only vectors some token needs. Returns ({id: vector}, stats)."""
    by_exact: dict[str, list[int]] = {}
    by_lower: dict[str, list[int]] = {}
    for i, s in enumerate(surfaces):
        if s is None:
            continue
        for p in _PREFIXES:
            s = s.removeprefix(p)
        if s:
            by_exact.setdefault(s, []).append(i)
            by_lower.setdefault(s.lower(), []).append(i)
    exact: dict[int, torch.Tensor] = {}
    lower: dict[int, torch.Tensor] = {}
    n_read, dim = 0, None
    for word, fields in iter_word_vectors(path):
        n_read += 1
        ids_exact = by_exact.get(word)
        ids_lower = by_lower.get(word.lower())
        if not ids_exact and not ids_lower:
            continue
        vec = torch.tensor([float(x) for x in fields], dtype=torch.float32)
        dim = vec.numel()
        for i in ids_exact or ():
            exact.setdefault(i, vec)
        for i in ids_lower or ():
            if surfaces[i] is not None and i not in exact:
                lower.setdefault(i, vec)  # the first (most frequent) spelling wins
    if n_read == 0:
        raise UserError(f"word-vector file '{path}' holds no vectors")
    matched = dict(lower)
    matched.update(exact)
    stats = {"vectors_read": n_read, "exact": len(exact), "lowercase": len(set(lower) - set(exact)),
             "vector_dim": dim}
    return matched, stats


def _projection(vectors: torch.Tensor, d: int, seed: int) -> tuple[torch.Tensor, str]:
    """(D → d) map: identity, PCA onto the top-d directions (D > d, enough vectors), or a random isometry."""
    n, D = vectors.shape
    if D == d:
        return torch.eye(D), "none"
    if D > d and n >= d:
        centered = vectors - vectors.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        return vh[:d].T.contiguous(), "pca"  # (D, d)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(D, d), min(D, d), generator=g))  # orthonormal columns
    return (q if D > d else q.T).contiguous(), "random"  # (D, d)


@torch.no_grad()
def init_embeddings_from(model: torch.nn.Module, tokenizer, path: str | os.PathLike, seed: int = 0
                         ) -> dict[str, Any]:
    """Overwrite the rows of ``model.tok_embeddings`` whose tokens match a word in ``path``; returns the
    coverage report (also the keys `lmforge pretrain` logs)."""
    emb = model.tok_embeddings.weight
    V, d = emb.shape
    if tokenizer.vocab_size > V:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has {V} rows; "
                        "set model.vocab_size to the tokenizer's size")
    surfaces = token_surfaces(tokenizer)
    matched, stats = match_vectors(surfaces, path)
    report = {"path": str(path), "vocab_size": tokenizer.vocab_size, "model_dim": d, **stats,
              "matched": len(matched), "coverage": round(len(matched) / max(1, tokenizer.vocab_size), 4),
              "projection": "none", "tied_head": bool(getattr(model.cfg, "tie_embeddings", False))}
    if not matched:
        return report
    ids = torch.tensor(sorted(matched))
    vectors = torch.stack([matched[int(i)] for i in ids]).double()
    proj, kind = _projection(vectors, d, seed)
    rows = (vectors - vectors.mean(0, keepdim=True)) @ proj.double()  # (n, d)
    target_std = float(emb.float().std()) or getattr(model.cfg, "init_std", 0.02)
    rows = rows / rows.std().clamp(min=1e-12) * target_std
    emb[ids.to(emb.device)] = rows.to(device=emb.device, dtype=emb.dtype)
    report["projection"] = kind
    return report


def coverage_line(report: dict[str, Any]) -> str:
    return (f"embeddings from {Path(report['path']).name}: {report['matched']:,}/{report['vocab_size']:,} tokens "
            f"({100 * report['coverage']:.1f}%; {report['exact']:,} exact, {report['lowercase']:,} lower-cased), "
            f"{report['vector_dim']}→{report['model_dim']} dims ({report['projection']})")


__all__ = ["coverage_line", "init_embeddings_from", "iter_word_vectors", "match_vectors", "token_surfaces"]
