"""One small tokenizer interface over a Hugging Face ``tokenizer.json`` or a SentencePiece ``tokenizer.model``.

``encode`` never adds special tokens on its own (whatever the file's post-processor says): BOS/EOS are
added only when asked with ``add_bos``/``add_eos``, so data preparation, training and generation agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lmforge.config import UserError, atomic_write_text

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
# Ids 0..6 of every tokenizer lmforge trains, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END)
CHAT_ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# <|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n  (generation prompt: "<|assistant|>\n")
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

META_FILE = "lmforge_tokenizer.json"
TEMPLATE_FILE = "chat_template.jinja"

# Names other tokenizers use for BOS / EOS / PAD, tried when the config files do not say.
_BOS_NAMES = (BOS, "<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_EOS_NAMES = (EOS, "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """The interface every part of lmforge uses (see the subclasses for the two backends)."""

    kind = "base"
    chat_template: str | None = None
    path: str | None = None

    # --- to be provided by a backend -------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, idx: int) -> str | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def hash(self) -> str:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    # --- shared -----------------------------------------------------------------------------------
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def pad_id(self) -> int | None:
        return self.token_to_id(self.pad_token) if self.pad_token else None

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise UserError(f"tokenizer {self.path or ''} has no BOS token; encode with add_bos=False")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise UserError(f"tokenizer {self.path or ''} has no EOS token; encode with add_eos=False")
            ids = [*ids, self.eos_id]
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._wrap(self._encode(text), add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        out = self._encode_batch(list(texts))
        if add_bos or add_eos:
            out = [self._wrap(ids, add_bos, add_eos) for ids in out]
        return out

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, hash={self.hash})")

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "vocab_size": self.vocab_size, "hash": self.hash}

    def _write_configs(self, directory: Path, tokenizer_class: str, extra: dict[str, Any] | None = None) -> None:
        specials = self.special_tokens
        role_tokens = [t for t in specials if t not in (self.bos_token, self.eos_token, self.pad_token)]
        smap: dict[str, Any] = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                   ("pad_token", self.pad_token)) if v}
        if role_tokens:
            smap["additional_special_tokens"] = role_tokens
        cfg: dict[str, Any] = {"tokenizer_class": tokenizer_class, **smap, "clean_up_tokenization_spaces": False,
                               "model_max_length": 1_000_000_000, "add_bos_token": False,
                               "add_eos_token": False, **(extra or {})}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
            atomic_write_text(directory / TEMPLATE_FILE, self.chat_template)
        elif (directory / TEMPLATE_FILE).exists():
            (directory / TEMPLATE_FILE).unlink()
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
        atomic_write_text(directory / "special_tokens_map.json", json.dumps(smap, indent=2, ensure_ascii=False))
        atomic_write_text(directory / META_FILE, json.dumps(self._meta(), indent=2, ensure_ascii=False))


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (BPE, WordPiece, Unigram: whatever the tokenizer.json holds)."""

    kind = "hf"

    def __init__(self, backend, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None, path: str | None = None):
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.path = path
        self._hash: str | None = None
        self._fast = hasattr(backend, "encode_batch_fast")

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.backend.encode_batch_fast if self._fast else self.backend.encode_batch
        return [e.ids for e in enc(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(int(idx))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.backend.get_added_tokens_decoder().items()) if t.special}

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = tokenizer_json_hash(json.loads(self.backend.to_str()))
        return self._hash

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tokenizer.json.tmp{os.getpid()}"
        self.backend.save(str(tmp))
        os.replace(tmp, directory / "tokenizer.json")
        self._write_configs(directory, "PreTrainedTokenizerFast")
        self.path = str(directory)
        return directory


def tokenizer_json_hash(data: dict[str, Any]) -> str:
    """sha256 over what decides the ids: model (vocab, merges, options), added tokens, normalizer and
    pre-tokenizer. Independent of the JSON layout ``tokenizers`` versions write (merges as "a b" or [a, b])."""
    model = dict(data.get("model") or {})
    merges = model.get("merges")
    if isinstance(merges, list):
        model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens") or [])
    canon = {"model": model, "added_tokens": added, "normalizer": data.get("normalizer"),
             "pre_tokenizer": data.get("pre_tokenizer")}
    blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``tokenizer.model`` (Llama-1/2, Mistral v1, many Chinese models)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str, chat_template: str | None = None, path: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None):
        try:
            import sentencepiece as spm
        except ImportError:
            raise UserError(f"'{model_file}' is a SentencePiece model; pip install sentencepiece") from None
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:
            raise UserError(f"'{model_file}' is not a readable SentencePiece model: {e}") from None
        self.model_file = str(model_file)
        self.chat_template = chat_template
        self.path = path or str(Path(model_file).parent)

        def piece(i: int) -> str | None:
            return self.sp.id_to_piece(i) if i >= 0 else None

        self.bos_token = bos_token or piece(self.sp.bos_id())
        self.eos_token = eos_token or piece(self.sp.eos_id())
        self.pad_token = pad_token or piece(self.sp.pad_id())
        self._hash: str | None = None

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if not skip_special_tokens:
            # SentencePiece drops control pieces when decoding; put them back as text.
            out, run = [], []
            for i in ids:
                if self.sp.is_control(i):
                    if run:
                        out.append(self.sp.decode(run))
                        run = []
                    out.append(self.sp.id_to_piece(i))
                else:
                    run.append(i)
            if run:
                out.append(self.sp.decode(run))
            return "".join(out)
        return self.sp.decode([i for i in ids if not self.sp.is_control(i)])

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.sp.id_to_piece(i):
            return None
        return i

    def id_to_token(self, idx: int) -> str | None:
        return self.sp.id_to_piece(int(idx)) if 0 <= int(idx) < self.vocab_size else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                if self.sp.is_control(i) or self.sp.is_unknown(i)}

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = "sha256:" + hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()[:16]
        return self._hash

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / "tokenizer.model"
        if Path(self.model_file).resolve() != target.resolve():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokenizer.model.tmp")
            os.close(fd)
            shutil.copyfile(self.model_file, tmp)
            os.replace(tmp, target)
        self._write_configs(directory, "LlamaTokenizer", {"legacy": False})
        self.model_file, self.path = str(target), str(directory)
        return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); fix or delete it") from None
    return data if isinstance(data, dict) else {}


def _special_names(directory: Path) -> tuple[dict[str, Any], str | None]:
    """bos/eos/pad names and the chat template from the config files beside the tokenizer."""
    cfg = _read_json(directory / "tokenizer_config.json")
    smap = _read_json(directory / "special_tokens_map.json")
    meta = _read_json(directory / META_FILE)
    names = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        for src in (meta, cfg, smap):
            name = _token_name(src.get(key))
            if name:
                names[key] = name
                break
    template = None
    if (directory / TEMPLATE_FILE).is_file():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str):
        template = cfg["chat_template"]
    return names, template


def _pick(name: str | None, candidates: tuple[str, ...], vocab: dict[str, int]) -> str | None:
    """The configured special-token name if the vocab has it, else the first known name it has."""
    if name in vocab:
        return name
    return next((c for c in candidates if c in vocab), None)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a dir holding ``tokenizer.json`` (preferred) or ``tokenizer.model``, or one of those files."""
    p = Path(path).expanduser()
    if p.is_file():
        directory, files = p.parent, [p]
    elif p.is_dir():
        directory, files = p, [p / "tokenizer.json", p / "tokenizer.model"]
    else:
        raise UserError(f"tokenizer '{path}' does not exist; pass a dir with tokenizer.json or tokenizer.model "
                        "(train one with `lmforge tokenizer train`)")
    names, template = _special_names(directory)
    for f in files:
        if not f.is_file():
            continue
        if f.suffix == ".json":
            from tokenizers import Tokenizer as _Backend

            try:
                backend = _Backend.from_file(str(f))
            except Exception as e:
                raise UserError(f"'{f}' is not a readable tokenizer.json: {str(e).splitlines()[0]}") from None
            vocab = backend.get_vocab(with_added_tokens=True)
            bos, eos, pad = (_pick(names.get(k), cands, vocab) for k, cands in
                             (("bos_token", _BOS_NAMES), ("eos_token", _EOS_NAMES), ("pad_token", _PAD_NAMES)))
            return HFTokenizer(backend, bos, eos, pad, template, str(directory))
        if f.suffix == ".model":
            return SentencePieceTokenizer(str(f), template, str(directory), names.get("bos_token"),
                                          names.get("eos_token"), names.get("pad_token"))
        raise UserError(f"'{f}' is neither a tokenizer.json nor a SentencePiece .model file")
    raise UserError(f"'{path}' holds no tokenizer.json or tokenizer.model; "
                    "train one with `lmforge tokenizer train` or pass the right dir")
