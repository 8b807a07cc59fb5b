"""The entry points as a user runs them: files written, and one clear line for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY


def assert_clean_error(proc, *fragments: str) -> None:
    err = proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in err, err


def test_train_one_epoch_on_synthetic(cli, tmp_path):
    proc = cli("train.py", *TINY, "model=resnet20", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy:" in proc.stdout
    names = {p.name for p in tmp_path.iterdir()}
    assert {"last.pt", "best.pt", "metrics.json", "config.yaml", "tb"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_acc", "best_test_acc", "epochs", "params", "macs", "size_bytes", "wall_s"):
        assert key in metrics
    assert metrics["epochs"] == 1 and metrics["params"] == 269_722
    assert metrics["size_bytes"] == 4 * 269_722 and metrics["macs"] > 40e6
    assert 0 <= metrics["test_acc"] <= 100


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    from compress.checkpoint import save_checkpoint
    from compress.models import create_model

    model = create_model("resnet20")
    path = tmp_path_factory.mktemp("ckpt") / "resnet20.pt"
    return save_checkpoint(path, {"arch": model.arch, "model": model.state_dict()})


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["model=resnet99"], ["Could not find 'model/resnet99'", "Available options", "resnet20"]),
        (["schedule.epochs=0"], ["error: schedule.epochs=0 is invalid: expected an integer >= 1"]),
        (["schedule.lr=-0.1"], ["error: schedule.lr=-0.1 is invalid: expected a learning rate"]),
        (["schedule.batch_size=0"], ["error: schedule.batch_size=0 is invalid"]),
    ],
)
def test_bad_config_is_one_clear_line(cli, tmp_path, overrides, fragments):
    assert_clean_error(cli("train.py", *TINY, *overrides, f"hydra.run.dir={tmp_path}"), *fragments)


def test_missing_dataset_without_download(cli, tmp_path):
    proc = cli(
        "train.py",
        "dataset=cifar10",
        f"dataset.root={tmp_path}/none",
        f"hydra.run.dir={tmp_path}/run",
    )
    assert_clean_error(proc, "error: dataset cifar10:", "not found", "dataset.download=true")


def test_corrupt_checkpoint_for_init_from(cli, tmp_path, resnet_ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(resnet_ckpt.read_bytes()[:1000])
    proc = cli("train.py", *TINY, "model=resnet20", f"init_from={bad}", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, f"error: init_from={bad}: checkpoint {bad} is corrupt or truncated")


def test_init_from_other_model_family(cli, tmp_path, resnet_ckpt):
    proc = cli(
        "train.py", *TINY, "model=nin", f"init_from={resnet_ckpt}", f"hydra.run.dir={tmp_path}"
    )
    assert_clean_error(proc, "holds a 'resnet20' model but model=nin", "pass model=resnet20")


def test_resume_continues_a_finished_cli_run(cli, tmp_path):
    assert cli("train.py", *TINY, "model=resnet20", f"hydra.run.dir={tmp_path}").returncode == 0
    first = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    proc = cli(
        "train.py",
        *TINY,
        "model=resnet20",
        "schedule.epochs=2",
        "resume=true",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert not torch.equal(first["fc.weight"], state["model"]["fc.weight"])
