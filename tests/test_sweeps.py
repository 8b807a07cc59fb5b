"""Sweeps keep going: a failing job of `train.py -m` is recorded with its reason (failed.json),
the other jobs run, the report has a status column and counts the failures, the process exits 1
at the end; a single run keeps its one-line error and exit code (2 input, 3 divergence)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compress.cli import FAILED_FILE, sweep_job, user_errors
from compress.errors import ConfigError
from compress.report import NO_METRICS, SweepReport, best, collect, main, write_report
from tests.conftest import ROOT, TINY
from tests.test_report import fake_run

# one short epoch of a 4-channel ResNet-20 on 8 x 8 images: a job takes a few seconds
SMALL = (*TINY, "model=resnet20", "model.channels=[4,4,4,4,4,4,4,4,4]", "dataset.image_size=8")
BAD_LR = "schedule.lr=-1 is invalid: expected a learning rate > 0"


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()), key=str)


# ---------------------------------------------------------------- the report, in process
@pytest.fixture
def sweep(tmp_path) -> Path:
    """A sweep directory as the jobs leave it: ok, failed, diverged (recorded, and only in
    metrics.json), interrupted, and a pipeline whose unfinished stage holds a metrics.json."""
    fake_run(tmp_path / "0_fp32", test_acc=80.0)
    fake_run(tmp_path / "1_w2a2", quant="w2a2", w_bits=2, a_bits=2, size_bytes=100, test_acc=70.0)
    failed = tmp_path / "2_bad"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "config.yaml").write_text("model:\n  name: nin_gc\nquant:\n  name: w4a4\n")
    (failed / FAILED_FILE).write_text(json.dumps({"status": "failed", "reason": BAD_LR}))
    (tmp_path / "3_nan").mkdir()
    (tmp_path / "3_nan" / FAILED_FILE).write_text(
        json.dumps({"status": "diverged", "reason": "training loss became non-finite"})
    )
    history = [{"epoch": 1, "train_loss": 2.0, "test_loss": float("nan"), "test_acc": 99.0}]
    fake_run(tmp_path / "4_silent_nan", test_acc=99.0, history=history)  # would be the best
    (tmp_path / "5_killed" / ".hydra").mkdir(parents=True)
    (tmp_path / "5_killed" / "train.log").write_text("")
    fake_run(tmp_path / "10_pipe", test_acc=60.0, quant="w4a4")
    fake_run(tmp_path / "10_pipe" / "01_prune" / "00_step", test_acc=1.0)  # not a run
    return tmp_path


def test_report_has_a_status_for_every_job_and_counts_failures(sweep):
    rows = write_report(sweep)
    status = {r["run"]: r["status"] for r in rows}
    assert list(status) == [
        "0_fp32",
        "1_w2a2",
        "2_bad",
        "3_nan",
        "4_silent_nan",
        "5_killed",
        "10_pipe",
    ]  # job 10 after job 5, stages are not runs
    assert status["0_fp32"] == status["1_w2a2"] == status["10_pipe"] == "ok"
    assert status["2_bad"] == f"failed: {BAD_LR}"
    assert status["3_nan"] == "diverged: training loss became non-finite"
    assert status["4_silent_nan"] == "diverged: non-finite test loss (epoch 1)"
    assert status["5_killed"] == NO_METRICS == "failed: no metrics (interrupted?)"
    bad = next(r for r in rows if r["run"] == "2_bad")
    assert (bad["model"], bad["quant"], bad["test_acc"], bad["delta_vs_fp32"]) == (
        "nin_gc",
        "w4a4",
        None,
        None,
    )
    assert best(rows)["run"] == "0_fp32"  # not the diverged job's 99%
    nan = next(r for r in rows if r["run"] == "4_silent_nan")
    assert nan["delta_vs_fp32"] is None and nan["compression_pct"] is None
    assert next(r for r in rows if r["run"] == "1_w2a2")["delta_vs_fp32"] == -10.0
    with open(sweep / "results.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["status"] for r in csv_rows] == [status[r["run"]] for r in csv_rows]
    md = (sweep / "results.md").read_text()
    assert "| test_acc | status |" in md and f"| failed: {BAD_LR} |" in md
    assert md.rstrip().endswith("7 runs: 3 ok, 2 failed, 2 diverged; best 0_fp32 (80.00%)"), md
    assert (sweep / "tradeoff.png").stat().st_size > 5000


def test_report_command_marks_a_job_without_metrics(sweep, capsys):
    (sweep / "1_w2a2" / "metrics.json").unlink()
    (sweep / "1_w2a2" / "config.yaml").write_text("model:\n  name: nin\n")
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| 1_w2a2 | nin | " in out and f"| {NO_METRICS} |" in out
    assert "7 runs: 2 ok, 3 failed, 2 diverged; best 0_fp32 (80.00%)" in out
    assert collect(sweep / "0_fp32")[0]["run"] == "."  # one run folder on its own


def test_callback_counts_failed_jobs_for_the_exit_code(sweep, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    report = SweepReport()
    report.on_multirun_start(config=config)
    assert SweepReport.failed == 0
    report.on_multirun_end(config=config)
    assert SweepReport.failed == 4
    out, err = capsys.readouterr()
    assert (
        f"sweep report: 7 runs: 3 ok, 2 failed, 2 diverged; best 0_fp32 (80.00%) -> {sweep}" in out
    )
    assert f"  2_bad: failed: {BAD_LR}" in err.splitlines()
    report.on_multirun_start(config=config)
    assert SweepReport.failed == 0
    report.on_job_end(config=config)  # the other callbacks are no-ops


# ---------------------------------------------------------------- one job, in process
def _raises(exc: BaseException):
    def task():
        with user_errors():
            raise exc

    return task


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (ConfigError(BAD_LR), "failed", BAD_LR),
        (
            FloatingPointError("training loss became non-finite"),
            "diverged",
            "training loss became non-finite",
        ),
        (RuntimeError("boom\nsecond line"), "failed", "RuntimeError: boom"),
        (SystemExit(4), "failed", "exit code 4"),
    ],
)
def test_a_failing_job_is_recorded_and_returns(tmp_path, caplog, exc, status, reason):
    with caplog.at_level(logging.ERROR, logger="compress.cli"):
        value = sweep_job(_raises(exc), tmp_path)
    assert math.isnan(value)
    assert json.loads((tmp_path / FAILED_FILE).read_text()) == {"status": status, "reason": reason}
    assert f"job {status}: {reason} (in {tmp_path / FAILED_FILE}); the sweep goes on" in caplog.text
    if isinstance(exc, RuntimeError):  # a bug: its traceback is kept in the job's log
        assert "Traceback" in caplog.text


def test_a_job_that_succeeds_clears_an_old_failure_and_ctrl_c_ends_the_sweep(tmp_path):
    (tmp_path / FAILED_FILE).write_text("{}")
    assert sweep_job(lambda: 12.5, tmp_path) == 12.5
    assert not (tmp_path / FAILED_FILE).exists()
    with pytest.raises(SystemExit) as e:
        sweep_job(_raises(KeyboardInterrupt()), tmp_path)
    assert e.value.code == 130 and not (tmp_path / FAILED_FILE).exists()


def test_a_single_run_keeps_its_line_and_exit_codes(entry, tmp_path):
    code, _, err = entry("train", *SMALL, "schedule.lr=-1", run_dir=tmp_path / "a")
    assert code == 2 and err.strip().splitlines() == [f"error: {BAD_LR}"]
    code, _, err = entry("train", *SMALL, "schedule.lr=1e30", run_dir=tmp_path / "b")
    assert code == 3 and len(err.strip().splitlines()) == 1 and "non-finite" in err
    assert not list(tmp_path.rglob(FAILED_FILE))  # only a sweep records failures


# ---------------------------------------------------------------- real sweeps, in subprocesses
def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *SMALL,
        *overrides,
        f"hydra.sweep.dir={tmp_path}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def check_sweep(proc: subprocess.CompletedProcess, sweep: Path, lrs: list[str]) -> list[dict]:
    """Every job ran, the bad ones are recorded, the report says so, the exit code is 1."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    jobs = job_dirs(sweep)
    assert len(jobs) == len(lrs)
    with open(sweep / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    for job, lr in zip(jobs, lrs, strict=True):
        status = rows[job.name]["status"]
        if lr == "-1":
            assert status == f"failed: {BAD_LR}"
            assert json.loads((job / FAILED_FILE).read_text())["status"] == "failed"
        elif lr == "1e30":
            assert status.startswith("diverged: ") and "non-finite" in status
        else:
            assert status == "ok" and (job / "metrics.json").exists(), status
    n_bad = sum(lr in ("-1", "1e30") for lr in lrs)
    assert f"sweep report: {len(lrs)} runs: {len(lrs) - n_bad} ok, 1 failed" in proc.stdout
    assert (sweep / "tradeoff.png").exists() and "best 0_" in (sweep / "results.md").read_text()
    return list(rows.values())


@pytest.mark.slow
def test_basic_launcher_sweep_goes_on_past_a_bad_value_and_divergence(tmp_path):
    lrs = ["0.1", "-1", "1e30", "0.05"]
    proc = run_sweep(tmp_path, "schedule.lr=" + ",".join(lrs))
    check_sweep(proc, tmp_path, lrs)
    assert "1 diverged" in proc.stdout
    # a job killed before its metrics: the report command says so
    last = job_dirs(tmp_path)[-1]
    (last / "metrics.json").unlink()
    report = subprocess.run(
        [sys.executable, "-m", "compress.report", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0 and f"| {NO_METRICS} |" in report.stdout
    assert "4 runs: 1 ok, 2 failed, 1 diverged" in report.stdout


@pytest.mark.slow
def test_joblib_launcher_sweep_goes_on(tmp_path):
    lrs = ["0.1", "-1", "1e30"]
    proc = run_sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "schedule.lr=" + ",".join(lrs)
    )
    check_sweep(proc, tmp_path, lrs)


@pytest.mark.slow
def test_submitit_local_launcher_sweep_goes_on(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    lrs = ["0.1", "-1"]
    proc = run_sweep(tmp_path, "hydra/launcher=submitit_local", "schedule.lr=" + ",".join(lrs))
    check_sweep(proc, tmp_path, lrs)
