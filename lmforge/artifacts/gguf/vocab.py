"""The tokenizer as GGUF metadata: what llama.cpp's ``gpt2`` (byte-level BPE) tokenizer model reads.

llama.cpp does not run a ``tokenizer.json``: it takes the vocabulary, the merges and a *named*
pre-tokenizer (``tokenizer.ggml.pre``), whose split regex it has built in. So the tokenizer's split
regex is matched against the ones llama.cpp knows:

* Llama-3's regex with ``ignore_merges`` (whole words found in the vocabulary win) → ``llama-bpe``;
* Qwen2's → ``qwen2``; GPT-2's byte-level split → ``gpt2``;
* others a caller names (``extra``: lmforge's own split, see ``lmforge.tokenizer.llama_cpp``).

Anything else is refused with the way out (export ``--format hf`` and use llama.cpp's converter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.config import UserError, read_json_bounded

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / padding / unknown
    chat_template: str | None = None
    note: str | None = None  # how the pre-tokenizer was matched, when not exactly


def _split_patterns(pre: dict | None) -> tuple[list[str], bool]:
    """The Split regexes of a tokenizer.json pre-tokenizer, and whether a ByteLevel step uses GPT-2's regex."""
    if not pre:
        return [], False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    patterns, gpt2_regex = [], False
    for step in steps or []:
        if step.get("type") == "Split":
            pat = step.get("pattern") or {}
            patterns.append(pat.get("Regex", pat.get("String")))
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            gpt2_regex = True
    return patterns, gpt2_regex


def pre_tokenizer_name(tokenizer_json: dict, extra: dict[str, tuple[str, str]] | None = None
                       ) -> tuple[str, str | None]:
    """(llama.cpp pre-tokenizer name, note) for a byte-level BPE tokenizer.json; UserError when unknown.
    ``extra``: more split regexes -> (name, note), matched when the model does not ignore merges."""
    patterns, gpt2_regex = _split_patterns(tokenizer_json.get("pre_tokenizer"))
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges"))
    if patterns == [] and gpt2_regex:
        return "gpt2", None
    if len(patterns) == 1 and not gpt2_regex:
        if patterns[0] == LLAMA3_SPLIT:
            return ("llama-bpe" if ignore_merges else "smaug-bpe"), None
        if patterns[0] == QWEN2_SPLIT:
            return "qwen2", None
        if patterns[0] in (extra or {}) and not ignore_merges:
            return extra[patterns[0]]
    raise UserError("this tokenizer's pre-tokenizer (split regex) is not one llama.cpp knows; GGUF export "
                    "supports lmforge's, Llama-3's, Qwen2's and GPT-2's byte-level BPE. Export with "
                    "--format hf and convert with llama.cpp's convert_hf_to_gguf.py")


def _merge_strings(merges: list) -> list[str]:
    out = []
    for m in merges:
        a, b = (m if isinstance(m, (list, tuple)) else m.split(" ", 1))
        if " " in a or " " in b:
            raise UserError(f"merge {m!r} holds a space, which GGUF's 'a b' merge strings cannot carry; "
                            "export with --format hf")
        out.append(f"{a} {b}")
    return out


def read_vocab(model_dir: Path, vocab_size: int, specials: dict[str, str | None],
               chat_template: str | None, extra_pre: dict[str, tuple[str, str]] | None = None) -> GGUFVocab:
    """The GGUF vocabulary of a model dir's ``tokenizer.json``, padded to the model's ``vocab_size``
    with unused ``[PAD{i}]`` tokens (as llama.cpp's converter does). ``specials``: bos/eos/padding/unknown
    token strings."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        what = "a SentencePiece tokenizer.model" if (model_dir / "tokenizer.model").is_file() else "no tokenizer"
        raise UserError(f"'{model_dir}' has {what}; GGUF export writes byte-level BPE tokenizers (tokenizer.json). "
                        "Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")
    data = read_json_bounded(path, what="tokenizer")
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a tokenizer.json (a JSON object); restore the tokenizer files")
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(data):
        raise UserError(f"'{path}' is not a byte-level BPE tokenizer (model {model.get('type')}); GGUF export "
                        "writes byte-level BPE only. Export with --format hf and use llama.cpp's converter")
    pre, note = pre_tokenizer_name(data, extra_pre)
    tok = Tokenizer.from_str(json.dumps(data))
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values(), default=-1) >= vocab_size:
        raise UserError(f"tokenizer in '{model_dir}' has ids up to {max(vocab.values())} but the model's "
                        f"vocab_size is {vocab_size}; the tokenizer does not belong to this model")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    ids = {}
    for key, text in specials.items():
        if text is not None and text in vocab:
            ids[key] = vocab[text]
    return GGUFVocab(tokens, types, _merge_strings(model.get("merges") or []), pre, ids, chat_template, note)


def _is_byte_level(data: dict) -> bool:
    def has(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(data.get("pre_tokenizer")) and has(data.get("decoder"))
