from __future__ import annotations

import csv
import json
import sys

import torch
import yaml
from hydra import compose, initialize_config_dir

from compress.cli import FAILED_FILE
from compress.report import collect, draw_panel, main, pareto_front, write_report
from tests.conftest import ROOT, TINY

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import configstore  # noqa: E402


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
    configstore.register()  # the schemas the groups' defaults name (base_distill, ...)
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


# ---------------------------------------------------------------- the Pareto front
def test_pareto_front_exact_sets():
    assert pareto_front([]) == []
    assert pareto_front([(5.0, 50.0)]) == [0]  # a single point is its own front
    # (150, 80) is beaten by (100, 90) in both; (50, 80) by (50, 85) at the same size
    pts = [(100, 90.0), (50, 85.0), (200, 95.0), (150, 80.0), (50, 80.0)]
    assert pareto_front(pts) == [0, 1, 2]
    assert pareto_front([(10, 5.0), (10, 5.0)]) == [0, 1]  # equal points: both on the front
    assert pareto_front([(10, 5.0), (10, 6.0)]) == [1]  # same size: the more accurate
    assert pareto_front([(10, 5.0), (20, 5.0)]) == [0]  # same accuracy: the smaller
    assert pareto_front([(10, 5.0), (20, 5.0), (10, 5.0), (30, 9.0)]) == [0, 2, 3]
    assert pareto_front([(1, 1.0), (2, 2.0), (3, 3.0)]) == [0, 1, 2]  # each trade is a step
    assert pareto_front([(3, 1.0), (2, 2.0), (1, 3.0)]) == [2]  # one beats them all


def _jobs(root):
    """Three trained jobs (one dominated), a failed one and two int8 (calibrate.py) jobs."""
    fake_run(root / "0_fp32", test_acc=90.0)  # 400 bytes
    fake_run(root / "1_w2a2", quant="w2a2", w_bits=2, a_bits=2, size_bytes=100, test_acc=85.5)
    fake_run(root / "2_w4a4", quant="w4a4", w_bits=4, a_bits=4, size_bytes=200, test_acc=80.0)
    (root / "3_bad").mkdir()
    (root / "3_bad" / FAILED_FILE).write_text(json.dumps({"status": "failed", "reason": "x"}))
    for name, acc, ms, size in (("4_ptq", 89.0, 0.5, 120), ("5_ptq", 88.0, 0.8, 110)):
        (root / name).mkdir()
        (root / name / "metrics.json").write_text(
            json.dumps(
                {
                    "model": "nin",
                    "dataset": "cifar10",
                    "calib_method": "minmax",
                    "test_acc": acc,
                    "best_test_acc": acc,
                    "int8_bytes": size,
                    "onnx_bytes": 4 * size,
                    "latency_ms_bs1_int8": ms,
                    "latency_ms_bs1_fp32": 2 * ms,
                    "pruned": False,
                }
            )
        )


def test_report_marks_the_pareto_jobs(tmp_path):
    _jobs(tmp_path)
    rows = {r["run"]: r for r in write_report(tmp_path)}
    # size: 0_fp32 (400, 90), 4_ptq (120, 89), 5_ptq (110, 88), 1_w2a2 (100, 85.5)
    assert [k for k, r in rows.items() if r["pareto"]] == ["0_fp32", "1_w2a2", "4_ptq", "5_ptq"]
    assert rows["2_w4a4"]["pareto"] is None and rows["3_bad"]["pareto"] is None
    assert [k for k, r in rows.items() if r["pareto_int8"]] == ["4_ptq"]  # 0.5 ms and 89%
    assert rows["5_ptq"]["int8_latency_ms"] == 0.8 and rows["0_fp32"]["int8_latency_ms"] is None
    assert rows["4_ptq"]["quant"] == "int8_ptq" and rows["4_ptq"]["w_bits"] == 8
    assert rows["4_ptq"]["size_bytes"] == 120 and rows["4_ptq"]["compression_pct"] == 70.0
    with open(tmp_path / "results.csv") as f:
        pareto = {r["run"]: r["pareto"] for r in csv.DictReader(f)}
    assert pareto == {
        "0_fp32": "yes",
        "1_w2a2": "yes",
        "2_w4a4": "",
        "3_bad": "",
        "4_ptq": "yes",
        "5_ptq": "yes",
    }
    md = (tmp_path / "results.md").read_text()
    assert "| test_acc | status | pareto |" in md
    assert "| 2_w4a4 | nin | cifar10 | w4a4 | 4 | 4 | train | no | 80.00 | ok |  |" in md
    assert "| 1_w2a2 | nin | cifar10 | w2a2 | 2 | 2 | train | no | 85.50 | ok | yes |" in md
    lines = md.splitlines()
    assert "Pareto front (test accuracy vs size): 0_fp32, 1_w2a2, 4_ptq, 5_ptq" in lines
    assert "Pareto front (test accuracy vs int8 latency): 4_ptq" in lines
    assert lines[-1].startswith("6 runs: 5 ok, 1 failed; best 0_fp32")


def test_pareto_fronts_are_per_data_set(tmp_path):
    fake_run(tmp_path / "a", test_acc=90.0)
    fake_run(tmp_path / "b", test_acc=50.0, size_bytes=800)  # dominated by a, not by c
    fake_run(tmp_path / "c", dataset="mnist", test_acc=99.0, size_bytes=100)
    fake_run(tmp_path / "d", dataset="mnist", test_acc=60.0, size_bytes=100)
    rows = {r["run"]: r["pareto"] for r in collect(tmp_path)}
    assert rows == {"a": "yes", "b": None, "c": "yes", "d": None}


def test_tradeoff_draws_the_front_as_a_step_line_and_a_latency_panel(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    _jobs(tmp_path)
    rows = collect(tmp_path)
    fig, ax = plt.subplots()
    (line,) = draw_panel(ax, rows, "size_bytes", 1024, "KiB")
    assert line.get_drawstyle() == "steps-post"
    assert line.get_xydata().tolist() == [
        [100 / 1024, 85.5],
        [110 / 1024, 88.0],
        [120 / 1024, 89.0],
        [400 / 1024, 90.0],
    ]
    assert line.get_marker() == "o" and line.get_markerfacecolor() == "none"  # ringed points
    plt.close(fig)
    write_report(tmp_path)
    two = imread(tmp_path / "tradeoff.png").shape
    for name in ("4_ptq", "5_ptq"):  # no int8 latency left: one panel
        (tmp_path / name / "metrics.json").unlink()
    write_report(tmp_path)
    one = imread(tmp_path / "tradeoff.png").shape
    assert two[0] == one[0] and two[1] > 1.5 * one[1], (two, one)
    assert "int8 latency" not in (tmp_path / "results.md").read_text()
    assert (
        "Pareto front (test accuracy vs size): 0_fp32, 1_w2a2"
        in (tmp_path / "results.md").read_text()
    )


# ---------------------------------------------------------------- what each job was
# one short epoch of a 4-channel ResNet-20 on 8 x 8 images
SMALL = (*TINY, "model=resnet20", "model.channels=[4,4,4,4,4,4,4,4,4]", "dataset.image_size=8")


def test_stages_say_what_each_entry_point_ran(entry, tmp_path):
    """Real runs of every entry point in one folder, as a sweep of each would leave its jobs."""
    fp32, qat = tmp_path / "0_train", tmp_path / "1_train_w4a4"
    assert entry("train", *SMALL, run_dir=fp32)[0] == 0
    assert entry("train", *SMALL, "quant=w4a4", run_dir=qat)[0] == 0
    prune = ("pruner.importance=l1", "pruner.percent=0.25")
    assert entry("prune", f"ckpt={fp32}/best.pt", *prune, run_dir=tmp_path / "2_prune")[0] == 0
    assert entry("fuse", f"ckpt={qat}/best.pt", run_dir=tmp_path / "3_fuse")[0] == 0
    assert entry("pack", f"ckpt={qat}/best.pt", "image_size=8", run_dir=tmp_path / "4_pack")[0] == 0
    deploy = ("latency=false", "dynamo=false", "opset=17")  # the quick exporter
    calib = ("calib.batches=1", "calib.batch_size=8")
    code, _, err = entry(
        "calibrate", f"ckpt={fp32}/best.pt", *deploy, *calib, run_dir=tmp_path / "5_calibrate"
    )
    assert code == 0, err
    code, _, err = entry("export", f"ckpt={fp32}/best.pt", *deploy, run_dir=tmp_path / "6_export")
    assert code == 0, err
    rows = {r["run"]: r for r in write_report(tmp_path)}
    assert {k: r["stages"] for k, r in rows.items()} == {
        "0_train": "train",
        "1_train_w4a4": "train",
        "2_prune": "prune",
        "3_fuse": "fuse",
        "4_pack": "pack",
        "5_calibrate": "calibrate",
        "6_export": "export",
    }
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["2_prune"]["pruned"] == "yes" and rows["3_fuse"]["quant"] == "w4a4"
    assert rows["5_calibrate"]["quant"] == "int8_ptq" and rows["5_calibrate"]["size_bytes"] > 0
    assert rows["6_export"]["quant"] == "fp32" and rows["6_export"]["size_bytes"] > 0
    assert rows["0_train"]["delta_vs_fp32"] == 0.0  # the trained fp32 job is the baseline
    md = (tmp_path / "results.md").read_text()
    assert "| 2_prune | resnet20 | synthetic | fp32 | 32 | 32 | prune | yes |" in md


def _failed_job(path, job_name=None, config=None):
    (path / ".hydra").mkdir(parents=True)
    if job_name:  # as Hydra writes it: hydra.job.name is the script's name
        hydra = {"hydra": {"run": {"dir": str(path)}, "job": {"name": job_name, "num": 0}}}
        (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if config is not None:
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    reason = {"status": "failed", "reason": "checkpoint /no/such.pt does not exist"}
    (path / FAILED_FILE).write_text(json.dumps(reason))


def test_stages_of_failed_and_interrupted_jobs(tmp_path):
    """A job without metrics: the entry point Hydra ran, train.py's saved config (a pipeline's
    stages), else the files it left."""
    _failed_job(tmp_path / "0_prune", "prune", {"ckpt": "/no/such.pt", "pruner": {}})
    _failed_job(tmp_path / "1_fuse", "fuse", {"ckpt": "/no/such.pt"})
    _failed_job(tmp_path / "2_calibrate", "calibrate")
    stages = ["train", "prune", {"stage": "quantize", "quant": {"name": "w4a4"}}]
    pipe = {"model": {"name": "nin"}, "schedule": {"stages": stages}}
    _failed_job(tmp_path / "3_pipe", "train", pipe)
    (tmp_path / "3_pipe" / "config.yaml").write_text(yaml.safe_dump(pipe))
    (tmp_path / "4_killed" / ".hydra").mkdir(parents=True)  # no hydra.yaml: the files tell
    torch.save({}, tmp_path / "4_killed" / "pruned.pt")
    (tmp_path / "5_train").mkdir()  # train.py saves config.yaml first
    (tmp_path / "5_train" / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "nin"}}))
    (tmp_path / "6_unknown" / ".hydra").mkdir(parents=True)
    rows = {r["run"]: r for r in collect(tmp_path)}
    assert {k: r["stages"] for k, r in rows.items()} == {
        "0_prune": "prune",
        "1_fuse": "fuse",
        "2_calibrate": "calibrate",
        "3_pipe": "train+prune+quantize",
        "4_killed": "prune",
        "5_train": "train",
        "6_unknown": None,
    }
    assert rows["3_pipe"]["status"].startswith("failed: ") and rows["3_pipe"]["model"] == "nin"


def test_stages_of_hand_made_metrics(tmp_path):
    """The metrics.json key each entry point alone writes decides; a pipeline lists its stages."""
    signs = {
        "prune": {"pruner": "normal", "channels_before": [4], "channels": [2], "size_bytes": 8},
        "fuse": {"bn_before": 3, "bn_after": 0, "fold_modes": {"normal": 3}},
        "pack": {"packed_layers": 3, "ratio": 8.0},
        "calibrate": {"calib_method": "minmax", "int8_bytes": 10},
        "export": {"exporter": "dynamo", "format": "onnx", "onnx_bytes": 40, "pruned": True},
        "train": {"history": [{"epoch": 1, "test_acc": 50.0}]},
    }
    for kind, m in signs.items():
        (tmp_path / kind).mkdir()
        metrics = {"model": "nin", "dataset": "cifar10", "test_acc": 50.0, **m}
        (tmp_path / kind / "metrics.json").write_text(json.dumps(metrics))
    pipe = [{"kind": "train"}, {"kind": "fuse"}, {"kind": "calibrate", "calib_method": "minmax"}]
    fake_run(tmp_path / "pipe", test_acc=50.0, stages=pipe)
    rows = {r["run"]: r for r in collect(tmp_path)}
    assert {k: r["stages"] for k, r in rows.items()} == {
        **{k: k for k in signs},
        "pipe": "train+fuse+calibrate",
    }
    assert rows["export"]["pruned"] == "yes" and rows["export"]["size_bytes"] == 40
    assert rows["pipe"]["quant"] == "fp32"  # its metrics name the quant: they are trusted
    del pipe[-1]["kind"]  # a stage list that does not say its kinds is not one
    fake_run(tmp_path / "odd", test_acc=50.0, stages=pipe)
    assert collect(tmp_path / "odd")[0]["stages"] == "train"  # fake_run's epochs


def test_a_sweep_of_detectors_ranks_them_by_map(tmp_path):
    det = {"model": "torchvision_det/ssdlite320_mobilenet_v3_large", "dataset": "cifar10_det"}
    fake_run(tmp_path / "0_fp32", map=20.0, best_map=20.0, **det)
    fake_run(tmp_path / "1_int8", quant="int8_qat", w_bits=8, a_bits=8, map=19.5, **det)
    fake_run(tmp_path / "2_nan", map=float("nan"), **det)
    rows = {r["run"]: r for r in write_report(tmp_path)}
    assert rows["1_int8"]["test_acc"] == 19.5 and rows["1_int8"]["metric"] == "mAP"
    assert rows["1_int8"]["delta_vs_fp32"] == -0.5
    assert rows["2_nan"]["status"] == "diverged: non-finite map"
