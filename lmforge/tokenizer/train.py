"""Train a byte-level BPE tokenizer (Hugging Face ``tokenizers``) from txt / jsonl / json / parquet inputs.

Pre-tokenization is CJK-aware: runs of Han / kana characters are split apart from Latin words (so
``中文abc`` is two pieces, not one), numbers are split into groups of at most three digits, and
punctuation (including full-width ，。) stands alone. Within a CJK run BPE is free to learn multi-character
words, so a tokenizer trained on mixed data gives Chinese characters and common words their own tokens
instead of three UTF-8 bytes each. There is no normalizer and the alphabet is all 256 bytes, so
``decode(encode(x)) == x`` for every string.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmforge.atomic import atomic_directory
from lmforge.config import UserError
from lmforge.console import info
from lmforge.sources import ReadStats, iter_documents
from lmforge.tokenizer.core import DEFAULT_CHAT_TEMPLATE, SPECIAL_TOKENS, HFTokenizer

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"  # English contractions
    rf"|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}\p{{M}}&&[^{_CJK}]]+"  # a non-CJK word, with its leading space
    rf"| ?[{_CJK}]+"  # a run of CJK characters (BPE learns words inside it)
    r"|\p{N}{1,3}"  # numbers, at most three digits a piece
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"  # punctuation (ASCII and full-width)
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"  # newlines and other whitespace
)

MAX_VOCAB = 1 << 20


def build_empty_bpe(special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """An untrained byte-level BPE ``tokenizers.Tokenizer`` with lmforge's pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(inputs: list[str] | str, vocab_size: int, out_dir: str | os.PathLike | None,
                    text_field: str = "text", txt_mode: str = "file", min_frequency: int = 2,
                    special_tokens: Sequence[str] = SPECIAL_TOKENS, max_bytes: int | None = None,
                    max_token_length: int | None = None, chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
                    progress: bool = True, include: list[str] | str | None = None) -> HFTokenizer:
    """Train on ``inputs`` (paths, globs, dirs, URLs; streamed) and save to ``out_dir`` (when given).

    ``special_tokens`` take ids 0..n-1; the first three are PAD, BOS and EOS (lmforge's defaults are
    ``<|pad|> <|bos|> <|eos|> <|system|> <|user|> <|assistant|> <|end|>``). ``max_bytes`` stops reading
    after that much text (a sample of a large corpus is enough for a tokenizer). ``include`` (``["*.py"]``)
    picks the files read inside input directories.
    """
    from tokenizers import pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
        raise UserError("special_tokens must list at least PAD, BOS and EOS, each once")
    floor = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size <= floor or vocab_size > MAX_VOCAB:
        raise UserError(f"--vocab-size={vocab_size} must be between {floor + 1} (256 bytes + "
                        f"{len(special_tokens)} special tokens) and {MAX_VOCAB}")
    if min_frequency < 1:
        raise UserError(f"min_frequency={min_frequency} must be at least 1")

    stats = ReadStats()
    counted = {"chars": 0, "bytes": 0, "docs": 0}
    t0 = time.perf_counter()
    last = [t0]

    def texts() -> Iterator[str]:
        for doc in iter_documents(inputs, text_field=text_field, txt_mode=txt_mode, stats=stats,
                                  include=include):
            if not doc.strip():
                continue
            counted["docs"] += 1
            counted["chars"] += len(doc)
            counted["bytes"] += len(doc.encode("utf-8", errors="replace"))
            yield doc
            now = time.perf_counter()
            if progress and now - last[0] > 5:
                last[0] = now
                info(f"tokenizer: read {counted['docs']:,} docs, {counted['bytes'] / 1e6:.1f} MB "
                     f"({counted['bytes'] / 1e6 / (now - t0):.1f} MB/s)")
            if max_bytes is not None and counted["bytes"] >= max_bytes:
                return

    tok = build_empty_bpe(special_tokens)
    kwargs = {}
    if max_token_length:
        kwargs["max_token_length"] = int(max_token_length)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **kwargs)
    tok.train_from_iterator(texts(), trainer=trainer)
    if counted["docs"] == 0:
        raise UserError(f"the inputs {list(inputs) if not isinstance(inputs, str) else inputs} hold no text; "
                        "check the paths and --text-field")
    result = HFTokenizer(tok, special_tokens[1], special_tokens[2], special_tokens[0], chat_template)
    result.train_stats = {"documents": counted["docs"], "chars": counted["chars"], "bytes": counted["bytes"],
                          "seconds": round(time.perf_counter() - t0, 2), "files": stats.files,
                          "invalid_utf8_documents": stats.invalid_utf8_documents,
                          "replaced_chars": stats.replaced_chars}
    if out_dir is not None:  # built beside out_dir and renamed into place: never a half-written tokenizer dir
        with atomic_directory(out_dir) as tmp:
            result.save(tmp)
        result.path = str(Path(out_dir))
    return result
