"""`lmforge tokenizer extend`'s model dir: the base's tokenizer grown by new tokens (learned by
`lmforge.tokenizer.extend`), its embedding (and untied LM head) rows grown to match, written as a new
model dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.heads_dir import HEADS_NAME
from lmforge.artifacts.metadata import BLOCK, CONFIG_NAME, read_config_json, read_metadata, write_json
from lmforge.artifacts.model_dir import DEFAULT_SHARD_BYTES, TOKENIZER_FILES, load_weights, save_weights
from lmforge.atomic import atomic_directory
from lmforge.config import UserError, read_json_bounded
from lmforge.console import info
from lmforge.tokenizer.core import META_FILE, load_tokenizer, tokenizer_json_hash
from lmforge.tokenizer.extend import (
    _chars_per_token,
    _mean_rows,
    _read_texts,
    check_extendable,
    extend_tokenizer_json,
)
from lmforge.tokenizer.identity import tokenizer_dir_hash


def extend_model_dir(base: str | os.PathLike, inputs: list[str], n_add: int, out: str | os.PathLike,
                     text_field: str = "text", txt_mode: str = "line", max_bytes: int | None = None,
                     eval_texts: list[str] | None = None) -> dict[str, Any]:
    """Extend ``base``'s tokenizer by ``n_add`` tokens learned on ``inputs`` and write the grown model to
    ``out``. Returns a report with chars/token before and after (on ``eval_texts``, default the corpus)."""
    base, out = Path(base), Path(out)
    if out.resolve() == base.resolve():
        raise UserError(f"--out '{out}' is the base model dir; write the extended model to a new dir")
    meta = read_metadata(base)
    cfg = meta.model_config()
    tok_path = base / "tokenizer.json"
    if not tok_path.is_file():
        raise UserError(f"'{base}' has no tokenizer.json; `tokenizer extend` needs a BPE tokenizer.json "
                        "(SentencePiece-only dirs: convert with transformers first)")
    if (base / HEADS_NAME).is_file() or meta.heads or meta.task != "lm":
        raise UserError(f"'{base}' is a task model (heads / classifier); extend the base language model instead")
    base_json = read_json_bounded(tok_path, what="tokenizer")
    check_extendable(base_json, n_add)
    texts = _read_texts(inputs, text_field, txt_mode, max_bytes)
    info(f"extend: learning up to {n_add:,} new tokens from {len(texts):,} documents …")
    new_json, added = extend_tokenizer_json(base_json, texts, n_add)
    new_size = max(a["id"] for a in added) + 1
    old_tok = load_tokenizer(base)
    if old_tok.vocab_size > cfg.vocab_size:
        raise UserError(f"'{base}': tokenizer has {old_tok.vocab_size} ids but model.vocab_size is {cfg.vocab_size}")

    sd = load_weights(base)
    old_rows = cfg.vocab_size
    # New ids follow the tokenizer's last id; rows a model pads beyond its tokenizer are reused first.
    new_rows = max(old_rows, new_size)
    emb = sd["tok_embeddings.weight"]
    grown = torch.cat([emb, emb.new_zeros(new_rows - old_rows, emb.shape[1])])
    init = _mean_rows(emb, added, old_rows)
    for a, row in zip(added, init):
        grown[a["id"]] = row
    sd["tok_embeddings.weight"] = grown
    if not cfg.tie_embeddings and "output.weight" in sd:
        head = sd["output.weight"]
        g2 = torch.cat([head, head.new_zeros(new_rows - old_rows, head.shape[1])])
        for a, row in zip(added, _mean_rows(head, added, old_rows)):
            g2[a["id"]] = row
        sd["output.weight"] = g2
    elif cfg.tie_embeddings:
        sd.pop("output.weight", None)

    data = read_config_json(base)  # the current metadata format, whatever the base was written in
    data["model"]["vocab_size"] = new_rows
    report = {"base": str(base), "out": str(out), "added": len(added), "requested": n_add,
              "old_vocab_size": old_rows, "new_vocab_size": new_rows,
              "first_new_id": added[0]["id"], "documents": len(texts)}
    data["tokenizer_extension"] = {k: report[k] for k in ("added", "old_vocab_size", "new_vocab_size",
                                                           "first_new_id")}
    with atomic_directory(out) as tmp:
        for name in TOKENIZER_FILES:
            if (base / name).is_file() and name != "tokenizer.json":
                shutil.copy2(base / name, tmp / name)
        (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
        if (tmp / META_FILE).is_file():
            meta = read_json_bounded(tmp / META_FILE, what="tokenizer metadata")
            meta.update(vocab_size=len(new_json["model"]["vocab"]) + len(new_json.get("added_tokens") or []),
                        hash=tokenizer_json_hash(new_json))
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if data[BLOCK].get("tokenizer_hash"):  # the recorded identity follows the new tokenizer files
            data[BLOCK]["tokenizer_hash"] = tokenizer_dir_hash(tmp)
        write_json(tmp / CONFIG_NAME, data)
        save_weights(sd, tmp, DEFAULT_SHARD_BYTES)
    new_tok = load_tokenizer(out)
    sample = eval_texts if eval_texts is not None else texts[: min(len(texts), 2000)]
    report["chars_per_token_before"] = round(_chars_per_token(old_tok, sample), 4)
    report["chars_per_token_after"] = round(_chars_per_token(new_tok, sample), 4)
    report["examples"] = [new_tok.decode([a["id"]]) for a in added if "\ufffd" not in new_tok.decode([a["id"]])][:10]
    return report


__all__ = ["extend_model_dir"]
