"""Models from outside the zoo: torchvision builders and a user's own, through every task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint
from compress.errors import ConfigError
from compress.models import create_model, register_model
from compress.models.registry import _MODELS
from compress.pipeline import run_pipeline
from compress.spec import model_from_checkpoint
from compress.tasks.common import resolve_root, source_dataset_cfg
from tests.test_engine import tiny_cfg

W4A4 = {
    "name": "w4a4",
    "weight": {"kind": "dorefa", "bits": 4},
    "act": {"kind": "dorefa", "bits": 4},
}


def test_register_model_takes_builders_with_kwargs():
    def wide_net(num_classes: int = 10, **kwargs) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(kwargs.get("in_channels", 3), kwargs.get("width", 4), 3),
            nn.Flatten(),
            nn.LazyLinear(num_classes),
        )

    register_model(wide_net)
    try:
        model = create_model("wide_net", num_classes=5, width=6, in_channels=1)
        assert model.arch == {"name": "wide_net", "num_classes": 5, "width": 6, "in_channels": 1}
        assert model[0].out_channels == 6 and model[0].in_channels == 1
    finally:
        _MODELS.pop("wide_net")


def test_torchvision_models_are_built_by_name():
    model = create_model("mobilenet_v2", source="torchvision", num_classes=7)
    assert model.arch["source"] == "torchvision" and model.arch["weights"] is None
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "resnet19", "source": "torchvision"}, "not a torchvision classification model"),
        ({"source": "custom", "target": "tests.nowhere.build"}, "cannot import tests.nowhere"),
        ({"source": "custom", "target": "tests.custom_models.nothing"}, "has no 'nothing'"),
        (
            {"source": "custom", "target": "tests.custom_models.not_a_model"},
            "not a torch nn.Module",
        ),
        ({"source": "custom", "target": "build"}, "expected package.module.builder"),
        ({"source": "custom"}, "needs model.target"),
        ({"name": "nin", "source": "keras"}, "model.source='keras' is invalid"),
        ({"name": "nin", "depth": 3}, "model=nin: got an unexpected keyword argument 'depth'"),
    ],
)
def test_bad_model_requests_are_one_clear_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model(**kwargs)


def staged(model: dict, *stages) -> dict:
    cfg = tiny_cfg(epochs=1)
    cfg["model"] = model
    cfg["pruner"] = {"name": "normal", "percent": 0.3, "base": 1, "min_channels": 1}
    cfg["schedule"]["stages"] = list(stages)
    return cfg


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
@pytest.mark.parametrize(
    "model",
    [
        {"source": "torchvision", "name": "resnet18"},
        {"source": "custom", "target": "tests.custom_models.small_cnn", "width": 8},
    ],
)
def test_outside_models_go_through_every_stage(tmp_path, model):
    stages = ("train", "prune", {"stage": "quantize", "quant": W4A4}, "fuse")
    summary = run_pipeline(staged(model, *stages), tmp_path)
    kinds = [s["kind"] for s in summary["stages"]]
    assert kinds == ["train", "prune", "quantize", "fuse"]
    pruned, quantized = summary["stages"][1], summary["stages"][2]
    assert pruned["params"] < pruned["params_before"]
    assert quantized["quant"] == "w4a4" and (quantized["w_bits"], quantized["a_bits"]) == (4, 4)
    fused = load_checkpoint(tmp_path / "03_fuse" / "fused.pt")
    assert fused["arch"]["source"] == model["source"] and fused["widths"] and fused["fused"]
    rebuilt = model_from_checkpoint(fused)  # pruned, quantized, fused: rebuilt with no code
    x = torch.randn(2, 3, 32, 32)
    again = model_from_checkpoint(fused)
    assert torch.equal(rebuilt.eval()(x), again.eval()(x))
    assert summary["stages"][3]["top1_agreement"] >= 90


def test_model_config_must_match_the_data():
    cfg = tiny_cfg(epochs=1)
    cfg["model"] = {"source": "torchvision", "name": "resnet18", "num_classes": 1000}
    with pytest.raises(ConfigError, match="model.num_classes=1000 but dataset=synthetic has 10"):
        run_pipeline(cfg, "unused")
    cfg["model"] = {"source": "torchvision", "name": "resnet18"}
    cfg["dataset"] = {**cfg["dataset"], "channels": 1}
    with pytest.raises(ConfigError, match="takes 3-channel images but dataset=synthetic has 1"):
        run_pipeline(cfg, "unused")


def test_prune_and_fuse_re_resolve_the_data_root(monkeypatch, tmp_path):
    template = "${oc.env:COMPRESS_DATA_DIR,data}/imagenet"
    monkeypatch.delenv("COMPRESS_DATA_DIR", raising=False)
    assert resolve_root(template) == "data/imagenet"
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tmp_path))
    assert resolve_root(template) == f"{tmp_path}/imagenet"
    stored = {
        "config": {"dataset": {"name": "cifar10", "root": "old/place", "root_template": template}}
    }
    assert source_dataset_cfg({}, stored)["root"] == f"{tmp_path}/imagenet"
    stored["config"]["dataset"].pop("root_template")  # a literal root stays as it was
    assert source_dataset_cfg({}, stored)["root"] == "old/place"


def test_the_train_entry_keeps_the_root_as_written():
    import configstore
    from tests.test_config import compose_cfg

    plain = configstore.plain_config(compose_cfg("train", ["dataset=imagenet"]))
    assert plain["dataset"]["root_template"] == "${oc.env:COMPRESS_DATA_DIR,data}/imagenet"
    synthetic = configstore.plain_config(compose_cfg("train", ["dataset=synthetic"]))
    assert "root_template" not in synthetic["dataset"]
