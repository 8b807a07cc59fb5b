from __future__ import annotations

import csv
import json

from hydra import compose, initialize_config_dir

from compress.report import collect, main, write_report
from tests.conftest import ROOT


def fake_run(path, **m):
    path.mkdir(parents=True)
    base = {
        "model": "nin",
        "dataset": "cifar10",
        "quant": "fp32",
        "w_bits": 32,
        "a_bits": 32,
        "params": 100,
        "macs": 1000,
        "size_bytes": 400,
        "epochs": 1,
        "wall_s": 1.0,
        "latency_ms": 2.0,
    }
    (path / "metrics.json").write_text(json.dumps({**base, **m}))


def test_report_rows_deltas_and_files(tmp_path):
    fake_run(tmp_path / "0_fp32", test_acc=90.0)
    fake_run(tmp_path / "1_w2a2", quant="w2a2", w_bits=2, a_bits=2, size_bytes=100, test_acc=85.5)
    fake_run(
        tmp_path / "2_pipe",
        quant="w4a4",
        test_acc=88.0,
        size_bytes=50,
        stages=[{"kind": "train"}, {"kind": "prune", "channels": [4]}, {"kind": "quantize"}],
    )
    (tmp_path / "2_pipe" / "00_train").mkdir()
    (tmp_path / "2_pipe" / "00_train" / "stage.json").write_text("{}")
    (tmp_path / "2_pipe" / "00_train" / "metrics.json").write_text("{}")
    rows = write_report(tmp_path)
    assert [r["run"] for r in rows] == ["0_fp32", "1_w2a2", "2_pipe"]  # stages are not runs
    assert rows[1]["delta_vs_fp32"] == -4.5 and rows[1]["compression_pct"] == 75.0
    assert rows[2]["stages"] == "train+prune+quantize" and rows[2]["pruned"] == "yes"
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000
    assert "| 1_w2a2 | nin |" in (tmp_path / "results.md").read_text()


def test_report_command_reproduces_the_csv(tmp_path, capsys):
    fake_run(tmp_path / "a", test_acc=70.0)
    write_report(tmp_path)
    first = (tmp_path / "results.csv").read_text()
    (tmp_path / "results.csv").unlink()
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "results.csv").read_text() == first
    assert main([str(tmp_path / "missing")]) == 2
    assert collect(tmp_path)[0]["delta_vs_fp32"] == 0.0


def test_launcher_configs_compose():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
            return_hydra_config=True,
        )
        assert "JoblibLauncher" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2
        cfg = compose(
            "train",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
        assert "SlurmLauncher" in cfg.hydra.launcher._target_
        assert cfg.hydra.launcher.partition == "gpu"
