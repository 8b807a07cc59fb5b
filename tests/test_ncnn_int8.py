"""QAT checkpoints in ncnn's int8: the QDQ model's integer convs written as ncnn int8 layers
(`export_ncnn_int8`), checked against the fake-quant PyTorch model on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

for _module in ("onnx", "onnxscript", "ncnn", "pnnx"):
    pytest.importorskip(_module)

from compress.deploy.ncnn_export import (  # noqa: E402
    export_ncnn_int8,
    load_net,
    ncnn_run,
)
from compress.deploy.qdq import to_qdq  # noqa: E402
from compress.models import create_model  # noqa: E402
from compress.quant import quantize_  # noqa: E402

SHAPE = (3, 32, 32)


def qat_nin(act_bits: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("nin", channels=[16] * 8)
    quantize_(
        model, {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": act_bits}}
    )
    model.train()
    with torch.no_grad():  # BN statistics
        for _ in range(3):
            model(torch.randn(16, *SHAPE))
    return model.eval()


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    model = qat_nin()
    qdq, _ = to_qdq(model)
    path, report = export_ncnn_int8(qdq, tmp_path_factory.mktemp("int8") / "m.ncnn.param", SHAPE)
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    return model, path, report, x, ref


def test_int8_layers_agree_with_the_fake_quant_model(int8_export):
    _, path, report, x, ref = int8_export
    # every conv but the first (float input) and the classifier (float weights)
    assert len(report["int8_layers"]) == 7
    assert set(report["fp32_layers"].values()) == {"float weights"}
    got = ncnn_run(load_net(path, threads=1), x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())


def test_ncnn_runs_the_int8_weights(int8_export):
    _, path, report, x, ref = int8_export
    text = path.read_text()
    assert text.count(" 8=2") == len(report["int8_layers"])
    data = path.with_suffix(".bin").read_bytes()
    tag = (0x000D4B38).to_bytes(4, "little")
    assert data.count(tag) >= len(report["int8_layers"])
    # with int8 inference off ncnn does not run these layers right: the int8 path is the one used
    net = load_net(path, threads=1)
    net.opt.use_int8_inference = False
    net.clear()
    assert net.load_param(str(path)) == 0 and net.load_model(str(path.with_suffix(".bin"))) == 0
    assert np.abs(ncnn_run(net, x[:8]) - ref[:8]).max() > 1e-2
    # negating the codes of the last int8 layer changes the logits
    at = data.rindex(tag) + 4
    n = 16 * 16  # conv 1x1 16 -> 16 before the classifier
    codes = np.frombuffer(data, np.int8, n, at)
    bad = path.parent / "bad.ncnn.param"
    bad.write_text(text)
    bad.with_suffix(".bin").write_bytes(data[:at] + (-codes).tobytes() + data[at + n :])
    got = ncnn_run(load_net(bad, threads=1), x[:8])
    assert np.abs(got - ref[:8]).max() > 1e-2


def test_8_bit_activations_keep_fp32_layers(tmp_path):
    model = qat_nin(act_bits=8)  # codes 0..255 do not fit ncnn's [-127, 127] input
    qdq, _ = to_qdq(model)
    path, report = export_ncnn_int8(qdq, tmp_path / "m.ncnn.param", SHAPE)
    assert report["int8_layers"] == []
    assert any("do not fit int8" in why for why in report["fp32_layers"].values())
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        ref = model(x).numpy()
    got = ncnn_run(load_net(path, threads=1), x)
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
