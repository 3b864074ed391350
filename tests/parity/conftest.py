"""Fixtures for the HF parity tests (builders live in hf_tiny.py)."""

from __future__ import annotations

import pytest


@pytest.fixture
def hf_dir(tmp_path):
    """Save a tiny HF model: hf_dir(model, name) -> path."""

    def save(model, name="hf", **kw):
        path = tmp_path / name
        model.save_pretrained(path, **kw)
        return path

    return save
