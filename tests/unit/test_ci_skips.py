"""CI runs with LMFORGE_REQUIRE_DATA=1: a skipped non-GPU test (missing data, a missing dependency) fails;
GPU tests still skip without CUDA. Checked by running pytest on a small suite under tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest
from tests.conftest import require_data
from pathlib import Path

import pytest

def test_passes():
    assert True

def test_missing_data():
    require_data(Path("/no/such/data/folder"))

def test_missing_dependency():
    pytest.importorskip("no_such_module_lmforge")

@pytest.mark.gpu
def test_on_gpu():
    pytest.skip("needs CUDA")

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
'''


def run(tmp_path: Path, require: bool) -> str:
    root = tmp_path / ("ci" if require else "local")
    (root / "tests").mkdir(parents=True)
    shutil.copy(TESTS / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "__init__.py").write_text("")
    (root / "tests" / "test_suite.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_REQUIRE_DATA"}
    if require:
        env["LMFORGE_REQUIRE_DATA"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root,
                       env=env, capture_output=True, text=True, timeout=600)
    return p.stdout


@pytest.mark.slow
def test_skips_fail_in_ci_except_gpu(tmp_path):
    out = run(tmp_path, require=True)
    tail = out.strip().splitlines()[-1]
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed" in tail, out
    assert "only GPU tests may skip" in out and "real data not found at /no/such/data/folder" in out


@pytest.mark.slow
def test_skips_stay_skips_locally(tmp_path):
    tail = run(tmp_path, require=False).strip().splitlines()[-1]
    assert "1 passed, 3 skipped, 1 xfailed" in tail, tail
