"""Vocabulary extension: teach a BPE tokenizer N new (Chinese) tokens without changing any existing id,
then grow the model's embedding and LM head to match.

``lmforge tokenizer extend --base MODEL_DIR --input CORPUS… --add N --out MODEL_DIR2`` (the CLI is
``extend_command``; the grown model dir is written by ``lmforge.artifacts.vocab.extend_model_dir``)

1. Train a BPE on the corpus with the base tokenizer's own normalizer and pre-tokenizer (so new tokens
   live in the same symbol space: byte-level characters, or SentencePiece-style characters).
2. Walk the learned merges in order (most frequent first). A merge result that the base lacks and that
   contains CJK text becomes a new token; the merges that build it from what the tokenizer already
   produces are appended after the base merges (intermediate byte pieces count as tokens too).
   Appended merges rank below every base merge and only fire on CJK bytes/characters, so text without
   CJK characters is tokenized exactly as before.
3. Each new embedding row (and LM-head row, when untied) is the mean of the base rows of the pieces the
   old tokenizer split the token into. Ids ≥ the old vocabulary size are the new tokens.

Only BPE ``tokenizer.json`` bases are supported (byte-level like GPT-2 / Llama-3 / lmforge's own, or
character-level with byte fallback like Llama-2's); WordPiece (BERT) splits CJK characters apart before
the model sees them, so multi-character tokens cannot exist there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from lmforge.config import UserError
from lmforge.sources import iter_documents


# ---- symbol spaces ---------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


def _is_cjk_char(ch: str) -> bool:
    o = ord(ch)
    return (0x3000 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF or 0x20000 <= o <= 0x2FA1F)


def _cjk_bytes(bs: bytes) -> bool:
    """True when these (possibly partial) UTF-8 bytes can only occur inside CJK characters: they contain a
    lead byte of U+3000–U+9FFF (E3–E9) or of the full-width forms (EF BC / EF BD)."""
    if any(0xE3 <= b <= 0xE9 for b in bs):
        return True
    return any(bs[i] == 0xEF and bs[i + 1] in (0xBC, 0xBD) for i in range(len(bs) - 1))


class _Space:
    """How a tokenizer.json BPE spells tokens: as byte-level characters or as plain characters."""

    def __init__(self, data: dict[str, Any]):
        self.byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or \
            "ByteLevel" in json.dumps(data.get("decoder"))
        self.byte_fallback = bool(data["model"].get("byte_fallback"))

    def symbols(self, token: str) -> list[str]:
        return list(token)

    def qualifies(self, token: str) -> bool:
        if self.byte_level:
            if any(c not in _BYTE_OF for c in token):
                return False
            return _cjk_bytes(bytes(_BYTE_OF[c] for c in token))
        return any(_is_cjk_char(c) for c in token)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank (lowest first) to one word; the classic BPE loop."""
    parts = list(symbols)
    inf = float("inf")
    while len(parts) > 1:
        best, at = inf, -1
        for i in range(len(parts) - 1):
            r = ranks.get((parts[i], parts[i + 1]), inf)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


# ---- the tokenizer ---------------------------------------------------------------------------------
def _train_candidates(base_json: dict[str, Any], texts: list[str], vocab_size: int) -> list[tuple[str, str]]:
    """Merges a fresh BPE learns on ``texts`` with the base's normalizer and pre-tokenizer, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    shell = dict(base_json)
    shell["added_tokens"] = []
    shell["post_processor"] = None
    shell["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    tok = Tokenizer.from_str(json.dumps(shell))
    tok.model = models.BPE()
    space = _Space(base_json)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if space.byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(texts, trainer=trainer)
    return _merge_pairs(json.loads(tok.to_str())["model"]["merges"])


def _new_char_tokens(base_json: dict[str, Any], texts: list[str], vocab: dict[str, int], limit: int
                     ) -> list[str]:
    """Character-level bases: CJK characters missing from the vocabulary, most frequent first."""
    from collections import Counter

    counts = Counter(c for t in texts for c in t if _is_cjk_char(c) and c not in vocab)
    return [c for c, n in counts.most_common(limit) if n >= 2]


def check_extendable(base_json: dict[str, Any], n_add: int) -> None:
    model = base_json.get("model") or {}
    if n_add <= 0:
        raise UserError(f"--add {n_add} must be positive")
    if model.get("type") != "BPE":
        raise UserError(f"vocabulary extension needs a BPE tokenizer; this one is {model.get('type')} "
                        "(WordPiece/Unigram vocabularies cannot grow multi-character Chinese tokens here)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise UserError(f"BPE option {key}={model[key]!r} is not supported by `tokenizer extend`")


def extend_tokenizer_json(base_json: dict[str, Any], texts: list[str], n_add: int
                          ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (new tokenizer.json dict, [{token, id, base_pieces}] for each added token, in id order)."""
    check_extendable(base_json, n_add)
    model = base_json["model"]
    space = _Space(base_json)
    vocab: dict[str, int] = dict(model["vocab"])
    base_vocab = dict(vocab)
    merges = _merge_pairs(model["merges"])
    base_ranks = {p: i for i, p in enumerate(merges)}
    ranks = dict(base_ranks)
    taken = set(vocab.values()) | {t["id"] for t in base_json.get("added_tokens") or []}
    next_id = max(taken) + 1
    added: list[dict[str, Any]] = []
    new_merges: list[tuple[str, str]] = []

    def base_pieces(token: str) -> list[int]:
        ids = []
        for piece in _bpe(space.symbols(token), base_ranks):
            if piece in base_vocab:
                ids.append(base_vocab[piece])
            elif space.byte_fallback:
                ids.extend(base_vocab[f"<0x{b:02X}>"] for b in piece.encode("utf-8") if f"<0x{b:02X}>" in base_vocab)
        return ids

    def add_token(token: str) -> None:
        nonlocal next_id
        vocab[token] = next_id
        added.append({"token": token, "id": next_id, "base_pieces": base_pieces(token)})
        next_id += 1

    if not space.byte_level:  # characters first: a merge can only build on symbols the vocabulary has
        for ch in _new_char_tokens(base_json, texts, vocab, n_add):
            add_token(ch)
    rounds, size = 0, 3 * n_add + 512
    while len(added) < n_add and rounds < 3:
        rounds += 1
        for a, b in _train_candidates(base_json, texts, size):
            if len(added) >= n_add:
                break
            target = a + b
            if target in vocab or not space.qualifies(target):
                continue
            syms = space.symbols(target)
            if any(s not in vocab for s in syms):
                continue
            pieces = _bpe(syms, ranks)
            # join the pieces the current tokenizer makes, left to right; every step a new qualifying token
            plan, acc = [], pieces[0]
            for p in pieces[1:]:
                plan.append((acc, p))
                acc = acc + p
            steps = [(x, y) for x, y in plan if x + y not in vocab]
            if not steps or len(added) + len(steps) > n_add or not all(space.qualifies(x + y) for x, y in steps):
                continue
            for x, y in plan:
                if (x, y) not in ranks:
                    ranks[(x, y)] = len(ranks)
                    new_merges.append((x, y))
                if x + y not in vocab:
                    add_token(x + y)
        size *= 2
    if not added:
        raise UserError("the corpus taught no new CJK tokens (the base may already cover it); "
                        "check --input or lower --add")
    out = json.loads(json.dumps(base_json))
    out["model"]["vocab"] = vocab
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    if as_strings and any(" " in x or " " in y for x, y in new_merges):
        as_strings = False
        out["model"]["merges"] = [list(p) for p in merges]
    out["model"]["merges"] = list(out["model"]["merges"]) + [
        f"{x} {y}" if as_strings else [x, y] for x, y in new_merges]
    return out, added


# ---- corpus and embedding rows (the model dir is written by lmforge.artifacts.vocab) -----------------------------------------------------------------------------
def _read_texts(inputs: list[str], text_field: str, txt_mode: str, max_bytes: int | None) -> list[str]:
    texts, n = [], 0
    for doc in iter_documents(inputs, text_field=text_field, txt_mode=txt_mode):
        if not doc.strip():
            continue
        texts.append(doc)
        n += len(doc.encode("utf-8"))
        if max_bytes and n >= max_bytes:
            break
    if not texts:
        raise UserError(f"the inputs {inputs} hold no text; check the paths and --text-field")
    return texts


def _chars_per_token(tok, texts: Iterable[str]) -> float:
    texts = list(texts)
    n_tok = sum(len(ids) for ids in tok.encode_batch(texts))
    return sum(len(t) for t in texts) / max(1, n_tok)


def _mean_rows(weight, added: list[dict[str, Any]], old_rows: int):
    import torch

    rows = []
    for a in added:
        ids = [i for i in a["base_pieces"] if i < old_rows]
        rows.append(weight[ids].float().mean(0) if ids else weight[:old_rows].float().mean(0))
    return torch.stack(rows).to(weight.dtype)
