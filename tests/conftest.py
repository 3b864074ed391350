import os
from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"  # vendored slices of real data (see data/SOURCE.md)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # full sets: benchmarks, demos
REQUIRE_DATA_ENV = "LMFORGE_REQUIRE_DATA"  # set to 1 in CI (.ci/run): a non-GPU skip is a failure


def require_data(path: Path) -> Path:
    """``path`` if it exists; else skip the test (or fail it under LMFORGE_REQUIRE_DATA=1)."""
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    return path


@pytest.fixture(scope="session")
def real_data() -> Path:
    """tests/data: small slices of real public text (redistributable licences), present in every clone."""
    return require_data(TEST_DATA)


def _is_gpu_test(item) -> bool:
    """Marked ``gpu`` or under tests/gpu/ (not ``"gpu" in item.keywords``: that also matches a checkout
    in a folder named gpu, and skipped every test there)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    try:
        rel = Path(str(item.fspath)).resolve().relative_to(Path(str(item.config.rootpath)).resolve())
    except ValueError:
        return False
    return "gpu" in rel.parts[:-1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under LMFORGE_REQUIRE_DATA=1 (CI) a skipped test fails — missing data, a missing dev dependency —
    except the GPU tests, which skip on a machine without CUDA."""
    outcome = yield
    rep = outcome.get_result()
    if (os.environ.get(REQUIRE_DATA_ENV) == "1" and rep.skipped and not hasattr(rep, "wasxfail")
            and not _is_gpu_test(item)):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = (f"{reason}\n{REQUIRE_DATA_ENV}=1: only GPU tests may skip; vendor the data into "
                        "tests/data/ or add the dependency to the dev extra")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if _is_gpu_test(item):
                item.add_marker(skip)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _make_tokenizer(directory: Path, lines: list[str], vocab_size: int = 400, name: str = "out"):
    from lmforge.tokenizer.train import train_tokenizer

    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    return train_tokenizer([str(directory / "corpus.txt")], vocab_size, directory / name, progress=False)


@pytest.fixture(scope="session")
def make_tokenizer():
    """``make_tokenizer(dir, lines, vocab_size=400, name="out")``: train a small BPE tokenizer on ``lines``
    (written to ``dir/corpus.txt``) into ``dir/name``."""
    return _make_tokenizer
