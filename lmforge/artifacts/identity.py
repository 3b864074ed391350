"""A model dir's tokenizer files are the ones its weights were trained with: the hash of its
``tokenizer.json`` / ``tokenizer.model`` against the ``tokenizer_hash`` its metadata records."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.artifacts.metadata import CONFIG_NAME, read_metadata
from lmforge.config import UserError
from lmforge.tokenizer.identity import tokenizer_dir_hash


def check_model_dir_tokenizer(model_dir: str | os.PathLike) -> None:
    """Raise a one-line error when the tokenizer files differ from the recorded hash (dirs without a
    config.json, tokenizer files or a recorded hash are not checked)."""
    d = Path(model_dir)
    if not (d / CONFIG_NAME).is_file():
        return
    expected = read_metadata(d).tokenizer_hash
    if not expected:
        return
    found = tokenizer_dir_hash(d)
    if found is not None and found != expected:
        raise UserError(f"the tokenizer files in '{model_dir}' (hash {found}) are not the ones its weights were "
                        f"trained with (its config.json records {expected}); restore the original tokenizer.json")


__all__ = ["check_model_dir_tokenizer"]
