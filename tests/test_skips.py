"""No hidden skips: a skip is for a machine that lacks a tool, never for code that broke, and
CI fails on a skip it does not expect (`COMPRESS_EXPECTED_SKIPS`, tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compress.deploy import xnor
from tests.conftest import ROOT, unexpected_skips


@pytest.fixture
def unbuilt(monkeypatch):
    monkeypatch.setattr(xnor, "_EXT", None)


def test_a_compile_error_in_the_xnor_kernel_is_a_failure_not_a_skip(unbuilt, monkeypatch):
    from torch.utils import cpp_extension

    def broken(**kw):
        raise RuntimeError("xnor_conv.cpp:12: error: expected ';' before '}' token")

    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(xnor.XnorBuildError, match="expected ';'") as e:
        xnor.extension()
    assert not isinstance(e.value, xnor.XnorToolchainMissing)  # test_xnor.py skips only those


def test_a_machine_without_a_compiler_is_a_skip_with_its_reason(unbuilt, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(xnor.XnorToolchainMissing, match="needs a C.. compiler"):
        xnor.extension()


def test_unexpected_skips_are_those_no_expected_reason_matches():
    skips = [("a.py::t1", "MNIST not available (no ../shared)"), ("b.py::t2", "broke")]
    assert unexpected_skips(skips, ["MNIST not available"]) == ["b.py::t2: broke"]
    assert unexpected_skips(skips, []) == [
        "a.py::t1: MNIST not available (no ../shared)",
        "b.py::t2: broke",
    ]
    assert unexpected_skips([], ["x"]) == []


def _pytest(tmp_path, expected: str | None) -> subprocess.CompletedProcess:
    test = tmp_path / "test_one_skip.py"
    test.write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\n"
        "def test_skipped():\n    pytest.skip('the runtime is not installed')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "COMPRESS_EXPECTED_SKIPS"}
    if expected is not None:
        (tmp_path / "skips.txt").write_text(f"# reasons\n{expected}\n")
        env["COMPRESS_EXPECTED_SKIPS"] = str(tmp_path / "skips.txt")
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:randomly", "-rs"]
    return subprocess.run(
        [*cmd, "-o", "addopts=", str(test)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_ci_fails_on_a_skip_it_does_not_expect_and_passes_on_one_it_does(tmp_path):
    assert _pytest(tmp_path, None).returncode == 0  # outside CI a skip is a skip
    listed = _pytest(tmp_path, "the runtime is not installed")
    assert listed.returncode == 0, listed.stdout
    other = _pytest(tmp_path, "MNIST not available")
    assert other.returncode == 1
    assert "1 skip(s) not expected here" in other.stdout
    assert "test_one_skip.py::test_skipped: the runtime is not installed" in other.stdout
