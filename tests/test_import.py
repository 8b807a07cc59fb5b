"""Starting from a model trained elsewhere: plain state_dict files, torchvision weights from a
local file or torch hub's cache, a new head for another class count, and the other entry points
reading such files as ckpt=."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint, load_weights_file
from compress.data import load_dataset
from compress.errors import CheckpointError, ConfigError
from compress.models import create_model
from compress.tasks import train as train_task
from compress.tasks.common import build_model, read_source
from tests.test_engine import tiny_cfg

SMALL = {"name": "resnet20", "channels": [4] * 9}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_train=64, num_test=32, seed=0)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model_state_dict": sd, "optimizer": {}},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},  # saved under DDP
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},  # saved after torch.compile
    ],
    ids=["plain", "state_dict", "model_state_dict", "ddp", "compiled"],
)
def test_a_plain_state_dict_imports_with_identical_logits(tmp_path, data, wrap):
    torch.manual_seed(1)
    theirs = create_model("resnet20", channels=[4] * 9, num_classes=10)
    for m in theirs.modules():  # trained-looking BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    torch.save(wrap(theirs.state_dict()), tmp_path / "theirs.pth")
    cfg = {**tiny_cfg(), "model": dict(SMALL), "init_from": str(tmp_path / "theirs.pth")}
    ours, state = build_model(cfg, data)
    assert state is None and ours.init_source["kind"] == "state_dict"
    assert ours.transfer is None
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(_logits(ours, x), _logits(theirs, x))


def test_import_then_train_records_where_the_weights_came_from(tmp_path):
    torch.save(create_model("resnet20", channels=[4] * 9).state_dict(), tmp_path / "w.pth")
    cfg = {**tiny_cfg(epochs=1), "init_from": str(tmp_path / "w.pth")}
    metrics = train_task.run(cfg, tmp_path / "run")
    assert metrics["init"] == {"kind": "state_dict", "path": str(tmp_path / "w.pth")}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["init"]["kind"] == "state_dict"
    # the checkpoint it wrote is a compress checkpoint: it rebuilds with no model= at all
    assert load_weights_file(tmp_path / "run" / "best.pt")[0] == "checkpoint"


def test_a_state_dict_of_another_model_is_one_line_with_the_model_that_fits(tmp_path, data):
    torch.save(create_model("resnet20", num_classes=10).state_dict(), tmp_path / "r20.pth")
    cfg = {**tiny_cfg(), "model": {"name": "nin"}, "init_from": str(tmp_path / "r20.pth")}
    with pytest.raises(CheckpointError) as e:
        build_model(cfg, data)
    msg = str(e.value)
    assert msg.startswith(f"init_from={tmp_path / 'r20.pth'}: the state_dict does not fit nin:")
    assert "missing keys " in msg and "unexpected keys " in msg
    assert msg.endswith("; it fits model=resnet20")
    # the same family, other widths: mis-shaped keys named with both shapes
    cfg["model"] = dict(SMALL)
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped layers.0.conv1.weight \(file 16x16x3x3, model 4x16x3x3\) and 53 more; "
        r"it fits model=resnet20 with its default settings \(drop the model.\* overrides\)$",
    ):
        build_model(cfg, data)


def test_files_that_hold_no_state_dict_are_refused(tmp_path, data):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "dict.pt")
    cfg = {**tiny_cfg(), "init_from": str(tmp_path / "list.pt")}
    with pytest.raises(CheckpointError, match="is neither a compress checkpoint nor a state_dict"):
        build_model(cfg, data)
    cfg["init_from"] = str(tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match=r"a dict with keys epoch, lr; expected torch.save"):
        build_model(cfg, data)


def test_a_new_class_count_gets_a_fresh_head(tmp_path, data):
    torch.manual_seed(0)
    theirs = create_model("resnet20", channels=[4] * 9, num_classes=100)
    torch.save(theirs.state_dict(), tmp_path / "c100.pth")
    cfg = {**tiny_cfg(), "model": dict(SMALL), "init_from": str(tmp_path / "c100.pth")}
    ours, _ = build_model(cfg, data)
    assert ours.transfer == {"head": "fc", "from_classes": 100, "to_classes": 10}
    sd, mine = theirs.state_dict(), ours.state_dict()
    assert all(torch.equal(sd[k], mine[k]) for k in sd if not k.startswith("fc."))
    assert mine["fc.weight"].shape == (10, sd["fc.weight"].shape[1])


# ---------------------------------------------------------------- torchvision weights
def _resnet18_file(tmp_path, name="resnet18-f37072fd.pth"):
    torch.manual_seed(0)
    imagenet = create_model("resnet18", source="torchvision")  # 1000 classes, weights=None
    path = tmp_path / name
    torch.save(imagenet.state_dict(), path)
    return imagenet, path


def test_torchvision_weights_from_a_file_train_with_a_new_head(tmp_path):
    imagenet, path = _resnet18_file(tmp_path)
    cfg = tiny_cfg(epochs=1, batch_size=16)
    cfg["model"] = {"source": "torchvision", "name": "resnet18", "weights": str(path)}
    metrics = train_task.run(cfg, tmp_path / "run")
    assert metrics["init"]["new_head"] == {"head": "fc", "from_classes": 1000, "to_classes": 10}
    assert metrics["init"]["kind"] == "torchvision_weights"
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    assert state["arch"]["num_classes"] == 10 and state["arch"]["weights"] is None
    # the backbone started from the file: before training it equals the file's weights
    data = load_dataset("synthetic", num_train=64, num_test=32, seed=0)
    fresh, _ = build_model({**cfg, "init_from": None}, data)
    sd = imagenet.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in fresh.state_dict().items() if k[:3] != "fc.")


def test_torchvision_weight_names_come_from_the_hub_cache_only(tmp_path, monkeypatch, data):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    cfg = {**tiny_cfg(), "model": {"source": "torchvision", "name": "resnet18"}}
    cfg["model"]["weights"] = "IMAGENET1K_V1"

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(
        CheckpointError,
        match=r"model.weights=IMAGENET1K_V1: resnet18-f37072fd.pth is not in the local torch hub "
        r"cache .*model.download=true",
    ):
        build_model(cfg, data)
    (hub / "checkpoints").mkdir(parents=True)
    imagenet, _ = _resnet18_file(hub / "checkpoints")
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model, _ = build_model({**cfg, "model": {**cfg["model"], "weights": name}}, data)
        assert torch.equal(model.conv1.weight, imagenet.conv1.weight), name
    with pytest.raises(ConfigError, match="model.weights=IMAGENET9 is invalid: expected a file"):
        build_model({**cfg, "model": {**cfg["model"], "weights": "IMAGENET9"}}, data)
    with pytest.raises(CheckpointError, match="model.weights=nope/x.pth: the file does not exist"):
        build_model({**cfg, "model": {**cfg["model"], "weights": "nope/x.pth"}}, data)


# ---------------------------------------------------------------- ckpt= for the other entries
@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_prune_fuse_export_take_a_state_dict_with_model(entry, tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet20", channels=[8] * 9)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.1, 1)
    torch.save(model.state_dict(), tmp_path / "theirs.pth")
    common = [
        f"ckpt={tmp_path / 'theirs.pth'}",
        "model=resnet20",
        "model.channels=[8,8,8,8,8,8,8,8,8]",
        "dataset=synthetic",
        "dataset.num_train=64",
        "dataset.num_test=32",
    ]
    code, _, err = entry("prune", *common, "pruner.percent=0.3", run_dir=tmp_path / "p")
    assert code == 0, err
    pruned = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert pruned["params"] < pruned["params_before"]
    code, _, err = entry("fuse", *common, run_dir=tmp_path / "f")
    assert code == 0, err
    code, _, err = entry("export", *common, "latency=false", run_dir=tmp_path / "e")
    assert code == 0, err
    assert (tmp_path / "e" / "model.onnx").is_file()
    code, _, err = entry(
        "calibrate", *common, "latency=false", "calib.batches=1", run_dir=tmp_path / "c"
    )
    assert code == 0, err
    code, _, err = entry("prune", common[0], run_dir=tmp_path / "x")
    assert code == 2 and "is a plain state_dict, which does not say what model it holds" in err
    code, _, err = entry("fuse", *common[:3], run_dir=tmp_path / "y")
    assert code == 2 and "does not record its data set: pass dataset=NAME" in err


def test_read_source_of_a_compress_checkpoint_is_unchanged(tmp_path):
    train_task.run(tiny_cfg(epochs=1), tmp_path / "run")
    state = read_source({"ckpt": str(tmp_path / "run" / "best.pt")}, "prune.py")
    assert state["arch"]["name"] == "resnet20" and state["format"] == "compress/1"


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_the_compress_trained_recipe_runs_from_a_state_dict(tmp_path):
    """experiment=compress_trained on a model trained elsewhere: prune by L1 to half the MACs,
    finetune with KD, LSQ W4A4 with KD, integer ONNX checked in ONNX Runtime (shortened)."""
    from compress.pipeline import run_pipeline
    from configstore import plain_config
    from tests.test_config import compose_cfg

    train_task.run(tiny_cfg(epochs=2), tmp_path / "theirs")  # "elsewhere": keep only weights
    weights = load_checkpoint(tmp_path / "theirs" / "best.pt")["model"]
    torch.save({"state_dict": weights}, tmp_path / "theirs.pth")
    overrides = [
        "experiment=compress_trained",
        "model=resnet20",
        "model.channels=[4,4,4,4,4,4,4,4,4]",
        f"init_from={tmp_path / 'theirs.pth'}",
        "dataset=synthetic",
        "dataset.num_train=64",
        "dataset.num_test=32",
        "schedule.batch_size=16",
        "schedule.progress=false",
        "device=cpu",
    ]
    cfg = plain_config(compose_cfg("train", overrides))
    for stage in cfg["schedule"]["stages"]:
        if isinstance(stage, dict) and "epochs" in stage:
            stage["epochs"] = 1
    cfg["schedule"]["stages"][-1]["latency"] = False
    summary = run_pipeline(cfg, tmp_path / "run")
    stages = {s["kind"]: s for s in summary["stages"]}
    assert stages["prune"]["macs_ratio"] == pytest.approx(0.5, abs=0.05)
    assert stages["quantize"]["quant"] == "w4a4l"
    for kind in ("finetune", "quantize"):
        assert stages[kind]["distill"]["teacher"] == str(tmp_path / "theirs.pth")
    assert (tmp_path / "run" / "03_export" / "model_int8.onnx").is_file()
