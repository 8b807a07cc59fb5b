"""Deployment in OpenVINO and ncnn: `export.py format=openvino|ncnn` on a model trained in
process, each file run in its own runtime and checked against PyTorch on the test set."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")

from compress.deploy import ExportError  # noqa: E402
from compress.deploy.ncnn_export import export_ncnn, load_net, ncnn_run  # noqa: E402
from compress.deploy.openvino_export import export_openvino  # noqa: E402


@pytest.mark.parametrize(
    ("fmt", "modules", "files"),
    [
        ("openvino", ("openvino", "onnxscript"), ("model.xml", "model.bin")),
        ("ncnn", ("ncnn", "pnnx", "onnxscript"), ("model.ncnn.param", "model.ncnn.bin")),
    ],
)
def test_export_runs_in_its_runtime_and_agrees(entry, trained, tmp_path, fmt, modules, files):
    for module in modules:
        pytest.importorskip(module)
    latency = "latency=true" if fmt == "ncnn" else "latency=false"
    code, out, err = entry(
        "export.py", f"ckpt={trained}", f"format={fmt}", latency, run_dir=tmp_path
    )
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["format"] == m["runtime"] == fmt and m["images"] == 128
    assert m["max_abs_diff"] < 1e-3 and m["top1_agreement"] == 100.0
    assert m["test_acc_fp32"] == m["test_acc_torch"]
    assert sum((tmp_path / f).stat().st_size for f in files) == m[f"{fmt}_bytes"] > 0
    assert "top-1 agreement 100.00%" in out
    if fmt == "ncnn":
        for b in (1, 64):
            assert m[f"latency_ms_bs{b}_fp32"] > 0 and m[f"speedup_bs{b}_ncnn_vs_torch"] > 0


class StridedSlice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, :, ::2, ::2]  # ncnn has no strided slice


def test_ncnn_names_a_model_it_cannot_express(tmp_path):
    for module in ("ncnn", "pnnx", "onnxscript"):
        pytest.importorskip(module)
    with pytest.raises(ExportError, match="cannot express StridedSlice in ncnn: .*Tensor.slice"):
        export_ncnn(StridedSlice(), tmp_path / "m.ncnn.param", (3, 8, 8))


def test_ncnn_batches_are_a_loop_of_images(tmp_path):
    for module in ("ncnn", "pnnx", "onnxscript"):
        pytest.importorskip(module)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
    net = load_net(export_ncnn(model, tmp_path / "m.ncnn.param", (3, 8, 8)))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert abs(torch.from_numpy(ncnn_run(net, x)) - model(x)).max() < 1e-5


def test_openvino_names_a_model_it_cannot_express(tmp_path):
    pytest.importorskip("openvino")
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="compress.test")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ExportError, match="convert_model cannot express Custom: "):
        export_openvino(path, tmp_path / "model.xml", "Custom")


@pytest.mark.parametrize(("fmt", "module"), [("openvino", "openvino"), ("ncnn", "ncnn")])
def test_missing_runtime_says_how_to_install(entry, tmp_path, monkeypatch, fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    code, _, err = entry("export.py", "ckpt=nowhere.pt", f"format={fmt}", run_dir=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{module} is not installed: pip install -e '.[deploy]'" in err


def test_calibrate_still_takes_only_onnx(entry, tmp_path):
    code, _, err = entry("calibrate.py", "ckpt=nowhere.pt", "format=ncnn", run_dir=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "format=ncnn is not built yet: only format=onnx here" in err
    assert "python export.py format=ncnn" in err
