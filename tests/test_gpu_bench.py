"""bench/gpu.sh, the lent-GPU results table, runs end to end on the CPU with tiny settings."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    only = "nin fp32,resnet20 slim 50% + finetune"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--tiny", "--only", only],
        cwd=ROOT,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "gpu_table.md").read_text()
    assert table.startswith("device: CPU") and "failed" not in table
    rows = [line for line in table.splitlines() if line.startswith("| nin") or "slim" in line]
    assert len(rows) == 2 and "| 2 |" in rows[1]  # sparse training + finetuning epochs
