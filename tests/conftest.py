"""Shared fixtures: real data prepared from ../shared when present, CLI runners, tiny configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# submitit configures logging when it is imported (logging.config.dictConfig with handlers on
# the sys.stdout / sys.stderr of that moment): imported inside a test, as the SLURM launcher's
# plugin is, it closes pytest's own logging handlers and binds submitit's to that test's
# captured streams, and a later test that logs through submitit crashes the whole session
# ("I/O operation on closed file", "lost sys.stderr"). Its loggers still propagate to root.
os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# Tiny, fast settings for CLI runs on the synthetic data set.
TINY = [
    "dataset=synthetic",
    "dataset.num_train=64",
    "dataset.num_test=32",
    "schedule.epochs=1",
    "schedule.batch_size=16",
    "schedule.progress=false",
    "device=cpu",
]


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """A folder with cifar-10-batches-py/: COMPRESS_DATA_DIR, ./data, or unpacked from ../shared."""
    for cand in (os.environ.get("COMPRESS_DATA_DIR"), ROOT / "data"):
        if cand and (Path(cand) / "cifar-10-batches-py" / "test_batch").exists():
            return Path(cand)
    unpack = SHARED / "cifar10" / "unpack.py"
    if not unpack.exists():
        pytest.skip("real CIFAR-10 not available (no ../shared/data/cifar10)")
    out = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(unpack), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    if not (SHARED / "mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("MNIST not available (no ../shared/data/mnist)")
    return SHARED / "mnist"


def run_cli(script: str, *overrides: str, cwd: Path = ROOT, timeout: int = 900):
    """Run an entry point as a user would; returns the CompletedProcess (text output)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def entry(capsys):
    """Run an entry point in process: compose its config as Hydra would, then call its `run`
    (the work inside the entry's error handler). Returns (exit code, stdout, stderr)."""
    import importlib

    from tests.test_config import compose_cfg

    def call(script: str, *overrides: str, run_dir: Path) -> tuple[int, str, str]:
        module = importlib.import_module(script.removesuffix(".py"))
        cfg = compose_cfg(script.removesuffix(".py"), list(overrides))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        try:
            module.run(cfg, Path(run_dir))
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture(autouse=True)
def _compress_loggers_enabled():
    """A runtime imported by an earlier test (OpenVINO / pnnx) can disable existing loggers;
    tests that read compress's log lines need them on."""
    import logging

    for name, lg in logging.root.manager.loggerDict.items():
        if name.startswith("compress") and isinstance(lg, logging.Logger):
            lg.disabled, lg.propagate = False, True
    if logging.root.level > logging.WARNING:
        logging.root.setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """best.pt of a ResNet-20 (8 channels, option-A shortcuts) trained 2 epochs on the synthetic
    set; shared by the deploy tests (one training for all of them)."""
    from compress.tasks import train as train_task
    from tests.test_engine import tiny_cfg

    cfg = tiny_cfg(epochs=2, lr=0.05, batch_size=16)
    cfg["model"]["channels"] = [8] * 9
    cfg["dataset"].update(num_train=256, num_test=128, crop_padding=0, flip=False)
    run_dir = tmp_path_factory.mktemp("train")
    metrics = train_task.run(cfg, run_dir)
    assert metrics["test_acc"] > 50  # it learned something: 10 classes
    return run_dir / "best.pt"


@pytest.fixture(autouse=True)
def _config_schemas_stored():
    """Hydra's ConfigStore holds the schemas the config groups' defaults name (base_quant,
    base_distill, ...); a test that composes must not depend on an earlier test having
    imported an entry point, and one that resets Hydra must not break the next."""
    import configstore

    configstore.register()
    configstore.register_deploy()


# ---------------------------------------------------------------- skips that CI expects
# `COMPRESS_EXPECTED_SKIPS=FILE` (set by .ci/run): every skip's reason must contain one of the
# lines of FILE, else the run fails: a skip that hides a failure (an extension that stopped
# compiling, a runtime that stopped importing) is not a pass.
_SKIPS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append((report.nodeid, reason.removeprefix("Skipped: ")))


def unexpected_skips(skips: list[tuple[str, str]], expected: list[str]) -> list[str]:
    """The skips whose reason contains none of the expected reasons."""
    return [f"{node}: {why}" for node, why in skips if not any(e in why for e in expected)]


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("COMPRESS_EXPECTED_SKIPS")
    if not path or exitstatus != 0:
        return
    lines = Path(path).read_text().splitlines()
    expected = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    bad = unexpected_skips(_SKIPS, expected)
    if bad:
        print(f"\n{len(bad)} skip(s) not expected here ({path}):", *bad, sep="\n  ")
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The random test order's seed (pytest-randomly), printed last, also under -q: a failure
    that depends on the order is rerun with `pytest --randomly-seed=N`."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and not isinstance(seed, str):
        terminalreporter.write_line(f"random test order: --randomly-seed={seed}")
