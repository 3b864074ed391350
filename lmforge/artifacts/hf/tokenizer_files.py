"""Tokenizer files across the boundary: HF files are copied into the lmforge model dir on import and
written back (``tokenizer.json`` + ``tokenizer_config.json`` with the chat template) on export, so
``AutoTokenizer.from_pretrained(out)`` works offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lmforge.config import UserError, read_json_bounded
from lmforge.models.config import ModelConfig

# Everything a transformers tokenizer may need; copied as they are.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.txt", "vocab.json",
                      "merges.txt")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _copy(src: Path, dst: Path, names=HF_TOKENIZER_FILES) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized form
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_obj(path: Path) -> dict:
    """A tokenizer/metadata JSON through the bounded reader ({} when it is not an object)."""
    data = read_json_bounded(path, what="tokenizer file")
    return data if isinstance(data, dict) else {}


def _special_tokens(tok_dir: Path) -> dict[str, str]:
    """Special-token strings from tokenizer_config.json / special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = tok_dir / name
        if p.is_file():
            data = _read_obj(p)
            for key in SPECIAL_KEYS:
                s = _token_str(data.get(key))
                if s is not None:
                    out.setdefault(key, s)
    return out


def _vocab_of(tokenizer_json: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).get_vocab(with_added_tokens=True)


def _convert_slow(hf_dir: Path, dst: Path) -> bool:
    """Old checkpoints ship only vocab/merges/sentencepiece files: let transformers build tokenizer.json."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return False
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True, trust_remote_code=False)
    except Exception:  # no usable tokenizer files: the model imports without one
        return False
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        return False
    backend.save(str(dst / "tokenizer.json"))
    return True


def import_tokenizer(hf_dir: Path, dst: Path, hf_cfg: dict[str, Any], generation: dict[str, Any],
                     cfg: ModelConfig) -> dict[str, Any]:
    """Copy the HF tokenizer files into the model dir (building tokenizer.json when only slow files exist)."""
    copied = _copy(hf_dir, dst)
    converted = False
    if "tokenizer.json" not in copied and copied:
        converted = _convert_slow(hf_dir, dst)
        if converted:
            copied.append("tokenizer.json")
    info: dict[str, Any] = {"files": copied, "converted": converted}
    if (dst / "tokenizer.json").is_file():
        vocab = _vocab_of(dst / "tokenizer.json")
        info["vocab_size"] = len(vocab)
        if max(vocab.values(), default=-1) >= cfg.vocab_size:
            raise_mismatch(hf_dir, max(vocab.values()) + 1, cfg.vocab_size)
    info["chat_template"] = _has_chat_template(dst)
    return info


def raise_mismatch(where: Path, tok_size: int, model_size: int) -> None:
    raise UserError(f"tokenizer in '{where}' has ids up to {tok_size - 1} but the model's vocab_size is "
                    f"{model_size}; the tokenizer does not belong to this model")


def _has_chat_template(d: Path) -> bool:
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    p = d / "tokenizer_config.json"
    return p.is_file() and bool(_read_obj(p).get("chat_template"))


def _chat_template_of(d: Path) -> str | None:
    """A chat template from any place lmforge or transformers keeps one."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        return _read_obj(d / "chat_template.json").get("chat_template")
    p = d / "tokenizer_config.json"
    if p.is_file():
        t = _read_obj(p).get("chat_template")
        if isinstance(t, str):
            return t
    meta = d / "lmforge_tokenizer.json"
    if meta.is_file():
        t = _read_obj(meta).get("chat_template")
        if isinstance(t, str):
            return t
    return None


def _lmforge_specials(d: Path) -> dict[str, str]:
    """Special tokens recorded by lmforge's own tokenizer metadata, mapped to transformers' names."""
    meta = d / "lmforge_tokenizer.json"
    if not meta.is_file():
        return {}
    data = _read_obj(meta)
    specials = data.get("special_tokens") or {}
    out = {}
    for key in SPECIAL_KEYS:
        short = key.removesuffix("_token")
        for cand in (key, short, f"{short}_token"):
            v = specials.get(cand, data.get(cand))
            if isinstance(v, str):
                out[key] = v
                break
    return out


def export_tokenizer(model_dir: Path, dst: Path, cfg: ModelConfig, hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """Write the tokenizer files into the HF dir and fill ``*_token_id`` in ``hf_cfg`` from them."""
    copied = _copy(model_dir, dst)
    if "tokenizer.json" not in copied:
        return {"files": copied, "chat_template": _has_chat_template(dst)}
    vocab = _vocab_of(dst / "tokenizer.json")
    if max(vocab.values(), default=-1) >= cfg.vocab_size:
        raise_mismatch(model_dir, max(vocab.values()) + 1, cfg.vocab_size)
    specials = {**_lmforge_specials(model_dir), **_special_tokens(model_dir)}
    tc_path = dst / "tokenizer_config.json"
    tc = _read_obj(tc_path) if tc_path.is_file() else {}
    if not tc:  # a tokenizer lmforge trained: describe it for transformers
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": cfg.max_seq_len}
        tc.update({k: v for k, v in specials.items() if v in vocab})
    template = _chat_template_of(model_dir)
    if template and not (dst / "chat_template.jinja").is_file() and not tc.get("chat_template"):
        tc["chat_template"] = template
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if "tokenizer_config.json" not in copied:
        copied.append("tokenizer_config.json")
    for key in ("bos_token", "eos_token", "pad_token"):
        s = _token_str(tc.get(key)) or specials.get(key)
        if s is not None and s in vocab:
            hf_cfg.setdefault(f"{key}_id", vocab[s])
            if hf_cfg.get(f"{key}_id") is None:
                hf_cfg[f"{key}_id"] = vocab[s]
    return {"files": copied, "chat_template": _has_chat_template(dst)}
