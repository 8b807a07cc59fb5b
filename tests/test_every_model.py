"""Every entry point on every registered model of the zoo, in process, on small random weights:
a model that one path cannot handle (an op one runtime lacks, a layer type one exporter
mishandles) fails here, not in a user's hands. The fast part prunes, fuses and packs; the
runtimes (calibrate, export to ONNX / OpenVINO / ncnn, float and integer) are marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.deploy.ncnn_export import unconverted_layers
from compress.deploy.onnx_export import export_onnx
from compress.models import create_model, list_models
from compress.models.resnet import GlobalMaxPool
from compress.quant import quantize_
from compress.spec import checkpoint_state
from compress.tasks import calibrate as calibrate_task
from compress.tasks import fuse as fuse_task
from tests.test_cli import assert_one_line

# small widths where the builder takes them (a model missing here is built as it comes)
SMALL: dict[str, dict] = {
    "nin": {"channels": [16] * 8},
    "nin_gc": {"channels": [16, 16, 16, 32, 32, 32, 32, 32]},
    "resnet20": {"channels": [4] * 9},
    "resnet32": {"channels": [4] * 15},
    "resnet56": {"channels": [4] * 27},
    "resnet9": {"width": 4},
    "vgg_small": {"channels": [8, 8, 16, 16, 16, 16]},
}
PRUNER = {"nin_gc": "gc"}  # group convs: the group-aware pruner; the others: network slimming
DATASET = {"name": "synthetic", "num_train": 64, "num_test": 32}
DATA = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_test=32"]
W4A4 = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}
FORMATS = ("onnx", "openvino", "ncnn")
HEAVY = {"resnet32", "resnet56"}  # resnet20's blocks, 2x and 3x as many: in the slow part


def every_model(light_fast: bool = False) -> list:
    """Every registered model; with `light_fast`, the heavy ones marked slow."""
    return [
        pytest.param(n, marks=pytest.mark.slow) if light_fast and n in HEAVY else n
        for n in list_models()
    ]


def random_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine terms as training leaves them (some gammas negative, none 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                sign = torch.where(torch.rand(n, generator=g) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(n, generator=g) + 0.2))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> {"fp32": path, "w4a4": path}: checkpoints of small random models, recording
    their data set as a trained checkpoint does; built once per model."""
    made: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            paths = {}
            for tag, quant in (("fp32", None), ("w4a4", W4A4)):
                model = create_model(name, **SMALL.get(name, {}))
                if quant:
                    quantize_(model, quant)
                random_bn_(model)
                paths[tag] = root / f"{tag}.pt"
                state = checkpoint_state(model, dataset="synthetic", config={"dataset": DATASET})
                save_checkpoint(paths[tag], state)
            made[name] = paths
        return made[name]

    return get


@pytest.fixture
def no_timing(monkeypatch):
    """fuse.py times the models before and after (minutes on a shared CPU): not here."""
    monkeypatch.setattr(fuse_task, "latency_ms", lambda *args, **kwargs: 0.0)


def run_ok(entry, script: str, *overrides: str, run_dir: Path) -> dict:
    """Run an entry point in process; it must succeed. Returns its metrics.json."""
    code, _, err = entry(script, *overrides, run_dir=run_dir)
    assert code == 0, err
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", every_model(light_fast=True))
def test_prune_fuse_and_pack(name, zoo, entry, tmp_path, no_timing):
    ckpt = zoo(name)
    pruner = (f"pruner={PRUNER.get(name, 'normal')}", "pruner.min_channels=2")
    pruned = run_ok(entry, "prune", f"ckpt={ckpt['fp32']}", *DATA, *pruner, run_dir=tmp_path / "p")
    assert pruned["params"] < pruned["params_before"]
    # the pruned model fused: every BN folded, the same predictions
    args = (f"ckpt={tmp_path / 'p' / 'pruned.pt'}", *DATA)
    fused = run_ok(entry, "fuse", *args, run_dir=tmp_path / "f")
    assert fused["bn_after"] == 0 and fused["top1_agreement"] == 100.0
    assert fused["max_rel_diff"] <= 1e-5
    # a quantized model fused exactly: its quantized weights kept, every logit as before
    qfused = run_ok(entry, "fuse", f"ckpt={ckpt['w4a4']}", *DATA, run_dir=tmp_path / "qf")
    assert qfused["bn_after"] == 0 and qfused["top1_agreement"] == 100.0
    assert qfused["max_rel_diff"] <= 1e-4 and qfused["fold_modes"]["scale"] > 0
    # packed at 4 bits, before and after fusion: the round trip is exact
    for src, out in ((ckpt["w4a4"], "pk"), (tmp_path / "qf" / "fused.pt", "pkf")):
        packed = run_ok(entry, "pack", f"ckpt={src}", run_dir=tmp_path / out)
        assert packed["max_abs_diff"] == 0.0 and packed["packed_layers"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", every_model())
def test_calibrate(name, zoo, entry, tmp_path):
    """The README's next step after training: post-training INT8 in ONNX Runtime."""
    args = (f"ckpt={zoo(name)['fp32']}", *DATA, "latency=false", "calib.batches=1")
    m = run_ok(entry, "calibrate", *args, "calib.batch_size=8", run_dir=tmp_path)
    assert m["top1_agreement"] == 100.0 and m["int8_bytes"] < m["onnx_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", every_model())
def test_export_float(name, fmt, zoo, entry, tmp_path):
    args = (f"ckpt={zoo(name)['fp32']}", *DATA, f"format={fmt}", "latency=false")
    m = run_ok(entry, "export", *args, run_dir=tmp_path)
    assert m["top1_agreement"] == 100.0 and m["max_abs_diff"] < 1e-3


INT8 = ("latency=false", "int8=true", "requant_batches=1")
# An integer model rounds its int32 biases, which moves an activation by a level now and then
# (compress.deploy.qdq); random weights have top-2 logit margins below that (78-100% agreement
# seen), trained ones do not (99-100%). A broken export agrees by chance: about 10%.
AGREE_INT8 = 50.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", every_model())
def test_export_quantized_as_integer_model(name, fmt, zoo, entry, tmp_path):
    """A w4a4 QAT checkpoint as its integer (QDQ / ncnn int8) model in every runtime."""
    args = (f"ckpt={zoo(name)['w4a4']}", *DATA, f"format={fmt}", *INT8)
    m = run_ok(entry, "export", *args, run_dir=tmp_path)
    assert m["int8"] is True and m["qdq_integer_layers"] > 0
    assert m["top1_agreement"] >= AGREE_INT8


@pytest.mark.slow
@pytest.mark.parametrize("name", every_model())
def test_export_fused_quantized_model(name, zoo, entry, tmp_path, no_timing):
    """An exactly fused QAT checkpoint exports as the same integer model as before fusion."""
    run_ok(entry, "fuse", f"ckpt={zoo(name)['w4a4']}", *DATA, run_dir=tmp_path / "f")
    args = (f"ckpt={tmp_path / 'f' / 'fused.pt'}", *DATA, *INT8)
    fused = run_ok(entry, "export", *args, run_dir=tmp_path / "e")
    plain = run_ok(
        entry, "export", f"ckpt={zoo(name)['w4a4']}", *DATA, *INT8, run_dir=tmp_path / "u"
    )
    assert fused["int8"] is True and fused["fused"] is True
    assert fused["qdq_integer_layers"] == plain["qdq_integer_layers"]
    assert fused["top1_agreement"] >= AGREE_INT8


# ---------------------------------------------------------------- what the sweep found
@pytest.mark.parametrize("opset", [18, 17])
def test_resnet9_global_max_pool_exports_as_a_max_pool(opset, tmp_path):
    """nn.AdaptiveMaxPool2d(1) exported at opset 18 as ReduceMax + Reshape, which ORT's
    symbolic shape inference (calibrate.py) and ncnn cannot take; GlobalMaxPool is a MaxPool
    over the whole map: the same values, the same checkpoint keys."""
    model = create_model("resnet9", width=4).eval()
    old = create_model("resnet9", width=4)
    old[8] = nn.AdaptiveMaxPool2d(1)  # the module the trained checkpoints were saved from
    assert isinstance(model[8], GlobalMaxPool) and isinstance(model[8], nn.AdaptiveMaxPool2d)
    assert model.state_dict().keys() == old.state_dict().keys()
    old.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), old.eval()(x))
    path = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32), opset=opset)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "ReduceMax" not in ops and "MaxPool" in ops


def test_ncnn_names_an_op_pnnx_left_under_its_onnx_name(tmp_path):
    param = tmp_path / "m.ncnn.param"
    param.write_text(
        "7767517\n3 3\nInput in0 0 1 in0\nReduceMax r 1 1 in0 a\nPooling p 1 1 a out0 0=1\n"
    )
    assert unconverted_layers(param) == ["ReduceMax"]  # looks like an ncnn type, is not one


def test_a_failure_inside_onnx_runtime_quantization_is_one_line(zoo, entry, tmp_path, monkeypatch):
    def shape_inference_fails(*args, **kwargs):
        raise TypeError("'NoneType' object is not iterable")

    monkeypatch.setattr(calibrate_task, "quantize_int8", shape_inference_fails)
    args = (f"ckpt={zoo('resnet9')['fp32']}", *DATA, "latency=false", "calib.batches=1")
    assert_one_line(
        entry("calibrate", *args, "calib.batch_size=8", run_dir=tmp_path),
        "error: ONNX Runtime cannot quantize resnet9 (ONNX from the dynamo exporter, opset 18): "
        "TypeError: 'NoneType' object is not iterable",
    )
