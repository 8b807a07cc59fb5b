"""Every entry point keeps a multirun going past a failing job, as train.py does
(tests/test_sweeps.py tests train.py's sweeps, the report and the launchers): the job's reason
goes to its failed.json, the other jobs run, and the process exits 1 at the end."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from compress.checkpoint import save_checkpoint
from compress.cli import FAILED_FILE
from compress.models import create_model
from compress.report import SweepReport
from tests.conftest import ROOT, TINY

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
import configstore  # noqa: E402

ENTRIES = {
    name: importlib.import_module(name)
    for name in ("train", "prune", "fuse", "calibrate", "export", "pack")
}
NO_CKPT = "checkpoint /no/such.pt does not exist"
# a value each entry refuses at once, and the line it refuses it with
FAILING = {
    "train": ([*TINY, "schedule.lr=-1"], "schedule.lr=-1 is invalid: expected a learning rate > 0"),
    "prune": (["ckpt=/no/such.pt"], NO_CKPT),
    "fuse": (["ckpt=/no/such.pt"], NO_CKPT),
    "calibrate": (["ckpt=/no/such.pt"], NO_CKPT),
    "export": (["ckpt=/no/such.pt"], NO_CKPT),
    "pack": (["ckpt=/no/such.pt"], NO_CKPT),
}


@pytest.fixture
def hydra_job_config(tmp_path):
    """Compose an entry's config as Hydra's main would and make it the current HydraConfig (in
    `mode`, with the job's output directory in tmp_path); returns the job's config."""

    def make(script: str, overrides: list[str], mode: RunMode) -> DictConfig:
        configstore.register()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(script, overrides=overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
            cfg.hydra.runtime.output_dir = str(tmp_path)
        HydraConfig.instance().set_config(cfg)
        job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        OmegaConf.set_struct(job, True)
        return job

    yield make
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize("script", list(FAILING))
def test_a_failing_job_of_every_entry_is_recorded_and_returns(hydra_job_config, tmp_path, script):
    overrides, line = FAILING[script]
    job = hydra_job_config(script, overrides, RunMode.MULTIRUN)
    assert math.isnan(ENTRIES[script].main(job))  # returned: the next job runs
    assert json.loads((tmp_path / FAILED_FILE).read_text()) == {"status": "failed", "reason": line}


@pytest.mark.parametrize("script", list(FAILING))
def test_a_single_run_of_every_entry_still_exits_2(hydra_job_config, tmp_path, capsys, script):
    overrides, line = FAILING[script]
    job = hydra_job_config(script, overrides, RunMode.RUN)
    with pytest.raises(SystemExit) as e:
        ENTRIES[script].main(job)
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"
    assert not (tmp_path / FAILED_FILE).exists()


def test_the_process_exits_1_after_a_sweep_with_a_failed_job(monkeypatch):
    monkeypatch.setattr(SweepReport, "failed", 0)
    configstore.exit_if_jobs_failed()  # a single run, or a sweep where every job finished
    monkeypatch.setattr(SweepReport, "failed", 2)
    with pytest.raises(SystemExit) as e:
        configstore.exit_if_jobs_failed()
    assert e.value.code == 1


@pytest.mark.slow
def test_prune_sweep_goes_on_past_a_bad_value(tmp_path):
    """A real `python prune.py -m`: the middle job's pruner.percent is out of range."""
    model = create_model("resnet20", channels=[8] * 9)
    ckpt = save_checkpoint(tmp_path / "r.pt", {"arch": model.arch, "model": model.state_dict()})
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "prune.py"),
        "-m",
        f"ckpt={ckpt}",
        "dataset=synthetic",
        "dataset.num_train=32",
        "dataset.num_test=32",
        "dataset.image_size=8",
        "pruner.importance=l1",
        "pruner.percent=0.3,1.5,0.5",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: p.name)
    assert [j.name[0] for j in jobs] == ["0", "1", "2"]
    assert (jobs[0] / "pruned.pt").exists() and (jobs[2] / "pruned.pt").exists()
    bad = "pruner.percent=1.5 is invalid: expected a fraction in [0, 1)"
    assert json.loads((jobs[1] / FAILED_FILE).read_text()) == {"status": "failed", "reason": bad}
    with open(sweep / "results.csv") as f:
        status = {r["run"]: r["status"] for r in csv.DictReader(f)}
    assert [status[j.name] for j in jobs] == ["ok", f"failed: {bad}", "ok"]
    assert "sweep report: 3 runs: 2 ok, 1 failed" in proc.stdout
    assert f"error: {bad}" in proc.stderr.splitlines()


def test_entry_points_share_the_sweep_helpers():
    """Each entry's main goes through configstore.hydra_job and its __main__ ends with
    exit_if_jobs_failed: a new entry point that forgets either would end sweeps again."""
    for name in ENTRIES:
        source = Path(ROOT / f"{name}.py").read_text()
        assert "return configstore.hydra_job(run, cfg)" in source, name
        assert "configstore.exit_if_jobs_failed()" in source.split('if __name__ == "__main__":')[1]
