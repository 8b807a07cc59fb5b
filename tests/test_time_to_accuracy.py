"""bench/time_to_accuracy.py: the framework's training and a bare torchvision DataLoader loop of
the same recipe, each a curve of test accuracy per epoch; the table says when each target was
reached (slow: two short trainings on real CIFAR-10 images)."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import time_to_accuracy  # noqa: E402


def test_the_recipe_is_base_cpus_schedule_evaluated_every_epoch():
    cfg = time_to_accuracy.recipe(7)
    assert (cfg.epochs, cfg.eval_every, cfg.batch_size, cfg.lr) == (7, 1, 128, 0.2)
    assert cfg.lr_schedule == "onecycle" and cfg.label_smoothing == 0.1 and not cfg.tta


def test_report_names_the_epoch_minutes_and_flops_of_each_target():
    curve = [(60.0, 80.0), (120.0, 86.0), (180.0, 88.5)]
    rows = time_to_accuracy.report("x", curve, [85.0, 90.0], pflops=0.5)
    assert rows == [
        "| x | 85% | 2 | 2.0 | 1.000 |",
        "| x | 90% | not reached (best 88.50%) | | |",
        "| x | 88.50% (final) | 3 | 3.0 | 1.500 |",
    ]


@pytest.mark.slow  # two 2-epoch trainings on 1,024 real images: about 20 s
def test_tiny_runs_both_loops_end_to_end(cifar_root, tmp_path, capsys):
    assert time_to_accuracy.main(["--tiny", "--data", str(cifar_root), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for loop in ("framework (engine.fit)", "bare PyTorch loop"):
        assert out.count(f"| {loop} |") == 3 and "(final) | 2 |" in out
    assert (tmp_path / "framework" / "last.pt").exists()
