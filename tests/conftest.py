import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the ../shared/data folder beside the checkout)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords or "/gpu/" in str(item.fspath):
                item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _make_tokenizer(directory: Path, lines: list[str], vocab_size: int = 400, name: str = "out"):
    from lmforge.tokenizer import train_tokenizer

    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return train_tokenizer([str(directory / "corpus.txt")], vocab_size, directory / name, progress=False)


@pytest.fixture(scope="session")
def make_tokenizer():
    """``make_tokenizer(dir, lines, vocab_size=400, name="out")``: train a small BPE tokenizer on ``lines``
    (written to ``dir/corpus.txt``) into ``dir/name``."""
    return _make_tokenizer
