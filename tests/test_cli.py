"""The entry points as a user runs them: files written, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY


def assert_clean_error(proc, *fragments: str) -> None:
    err = proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.slow
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


@pytest.mark.slow
def test_unknown_group_option_is_hydras_own_message(cli, tmp_path):
    proc = cli("train.py", *TINY, "model=resnet99", f"hydra.run.dir={tmp_path}")
    assert_clean_error(proc, "Could not find 'model/resnet99'", "Available options", "resnet20")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["schedule.epochs=0"], "error: schedule.epochs=0 is invalid: expected an integer >= 1"),
        (["schedule.lr=-0.1"], "error: schedule.lr=-0.1 is invalid: expected a learning rate"),
        (["schedule.batch_size=0"], "error: schedule.batch_size=0 is invalid"),
    ],
)
def test_bad_config_is_one_clear_line(entry, tmp_path, overrides, fragment):
    code, _, err = entry("train", *TINY, *overrides, run_dir=tmp_path)
    assert code == 2 and err.strip().count("\n") == 0 and fragment in err, err


def assert_one_line(result, *fragments: str) -> None:
    code, _, err = result
    assert code == 2 and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_dataset_without_download(entry, tmp_path):
    result = entry("train", "dataset=cifar10", f"dataset.root={tmp_path}/none", run_dir=tmp_path)
    assert_one_line(result, "error: dataset cifar10:", "not found", "dataset.download=true")


def test_corrupt_checkpoint_for_init_from(entry, tmp_path, resnet_ckpt):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(resnet_ckpt.read_bytes()[:1000])
    result = entry("train", *TINY, "model=resnet20", f"init_from={bad}", run_dir=tmp_path)
    assert_one_line(result, f"error: init_from={bad}: checkpoint {bad} is corrupt or truncated")


def test_init_from_other_model_family(entry, tmp_path, resnet_ckpt):
    result = entry("train", *TINY, "model=nin", f"init_from={resnet_ckpt}", run_dir=tmp_path)
    assert_one_line(result, "holds a 'resnet20' model but model=nin", "pass model=resnet20")


@pytest.mark.slow
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


@pytest.mark.slow
def test_fuse_cli_end_to_end(cli, tmp_path):
    train = tmp_path / "train"
    assert (
        cli(
            "train.py",
            *TINY,
            "model=nin",
            "model.channels=[16,16,16,16,16,16,16,16]",
            f"hydra.run.dir={train}",
        ).returncode
        == 0
    )
    out = tmp_path / "fused"
    proc = cli("fuse.py", f"ckpt={train}/best.pt", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "max |logit diff|" in proc.stdout and "latency bs=64" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 100.0
    assert m["bn_before"] == 9 and m["bn_after"] == 0
    for key in (
        "test_acc_before",
        "test_acc",
        "params",
        "size_bytes",
        "latency_ms_bs1_before",
        "latency_ms_bs1_after",
        "latency_ms_bs64_before",
        "latency_ms_bs64_after",
    ):
        assert key in m
    from compress.checkpoint import load_checkpoint
    from compress.spec import model_from_checkpoint

    fused = model_from_checkpoint(load_checkpoint(out / "fused.pt"))
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in fused.modules())


def test_fuse_refuses_a_fused_checkpoint(entry, tmp_path):
    out = tmp_path / "f"
    train = tmp_path / "t"
    model = ("model=resnet20", "model.channels=[4,4,4,4,4,4,4,4,4]")
    assert entry("train", *TINY, *model, run_dir=train)[0] == 0
    assert entry("fuse", f"ckpt={train}/best.pt", run_dir=out)[0] == 0
    assert_one_line(entry("fuse", f"ckpt={out}/fused.pt", run_dir=tmp_path / "a"), "already fused")


@pytest.mark.slow
def test_quantized_training_via_group_and_overrides(cli, tmp_path):
    proc = cli("train.py", *TINY, "model=resnet20", "quant=w2a2", f"hydra.run.dir={tmp_path}/a")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert (m["quant"], m["w_bits"], m["a_bits"]) == ("w2a2", 2, 2)
    assert m["size_bytes"] < 0.2 * 4 * m["params"]
    proc = cli(
        "train.py",
        *TINY,
        "model=resnet20",
        "quant.weight.kind=ternary",
        "quant.act.kind=dorefa",
        "quant.act.bits=4",
        f"hydra.run.dir={tmp_path}/b",
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (m["w_bits"], m["a_bits"]) == (2, 4)
    state = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert state["quant"]["weight"]["kind"] == "ternary"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["quant.weight.kind=dorefa", "quant.weight.bits=1"], "quant.weight.bits=1 is invalid"),
        (["quant.act.kind=int4"], "quant.act.kind='int4' is invalid: expected one of"),
        (["quant.act.grad=fast_ste"], "quant.act.grad='fast_ste' is invalid"),
        (["quant=wta32", "quant.weight.gap=0"], "quant.weight.gap=0 is invalid"),
        (["quant=w4a4", "quant.keep=[layers.99.conv1]"], "quant.keep: the model has no"),
    ],
)
def test_bad_quant_config_is_one_clear_line(entry, tmp_path, overrides, fragment):
    assert_one_line(entry("train", *TINY, "model=resnet20", *overrides, run_dir=tmp_path), fragment)


@pytest.mark.slow
def test_sweep_job_folders_leave_out_path_values(cli, tmp_path, resnet_ckpt):
    proc = cli(
        "train.py",
        "-m",
        *TINY,
        "model=resnet20",
        f"init_from={resnet_ckpt}",  # a path: it would nest each job's folder
        "quant=fp32,w4a4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2 and all("init_from" not in r for r in runs), runs


@pytest.mark.slow
def test_multirun_sweep(cli, tmp_path):
    proc = cli(
        "train.py",
        "-m",
        *TINY,
        "model=resnet20,vgg_small",
        "quant=fp32,w4a4",
        "schedule.batch_size=32",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p.parent.name for p in tmp_path.glob("*/metrics.json"))
    assert len(runs) == 4
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 5 and (tmp_path / "tradeoff.png").stat().st_size > 5000
    assert "sweep report: 4 runs" in proc.stdout
    first = (tmp_path / "results.csv").read_text()
    (tmp_path / "results.csv").unlink()  # the report command must write it again
    report = subprocess.run(
        [sys.executable, "-m", "compress.report", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert report.returncode == 0 and (tmp_path / "results.csv").read_text() == first


@pytest.mark.slow
def test_progressive_quantization_experiment(cli, tmp_path):
    proc = cli(
        "train.py",
        "experiment=progressive",
        *TINY,
        "model.channels=[4,4,4,4,4,4,4,4,4]",
        f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    stages = json.loads((tmp_path / "metrics.json").read_text())["stages"]
    assert [s["quant"] for s in stages] == ["fp32", "w8a8", "w4a4", "w2a2", "wtab"]
    assert [s["w_bits"] for s in stages] == [32, 8, 4, 2, 2]
    assert stages[-1]["a_bits"] == 1
    cfg = torch.load(tmp_path / "02_w4a4" / "best.pt", weights_only=True)["config"]
    assert cfg["init_from"].endswith("01_w8a8/best.pt")  # each stage from the previous best


@pytest.mark.parametrize("quant", sorted(p.stem for p in (ROOT / "conf" / "quant").glob("*.yaml")))
def test_every_quant_config_builds_and_is_named_by_its_settings(quant):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from compress.models import create_model
    from compress.quant import bit_widths, quant_label, quantize_

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"quant={quant}"])
    q = OmegaConf.to_container(cfg.quant)
    name = q.pop("name")
    assert quant_label(q) == name
    model = quantize_(create_model("resnet20"), q)
    assert (bit_widths(model) == (32, 32)) == (name == "fp32")
