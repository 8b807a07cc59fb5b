"""Deployment in a real runtime: ONNX export checked in ONNX Runtime against PyTorch, and
post-training static INT8 (QDQ) with ORT's calibrators, on a model trained in process."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from compress.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from compress.deploy import (  # noqa: E402
    ExportError,
    ImageCalibrationReader,
    agreement,
    calibration_loader,
    cpu_isa,
    export_onnx,
    ort_logits,
    qdq_summary,
    quantize_int8,
    session,
)
from compress.quant import quantize_  # noqa: E402
from compress.spec import checkpoint_state, model_from_checkpoint  # noqa: E402
from compress.tasks import fuse as fuse_task  # noqa: E402
from compress.tasks import prune as prune_task  # noqa: E402
from compress.tasks.common import eval_loader, load_data, source_dataset_cfg  # noqa: E402

W4A4 = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The fp32 model of `trained` exported to ONNX, with its data set."""
    state = load_checkpoint(trained)
    model = model_from_checkpoint(state).eval()
    data = load_data(source_dataset_cfg({}, state), 0)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", data.image_shape)
    return model, data, path


def test_fp32_export_equals_pytorch_in_ort(entry, trained, tmp_path):
    code, out, err = entry("export.py", f"ckpt={trained}", "latency=false", run_dir=tmp_path)
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "model.onnx").stat().st_size == m["onnx_bytes"] > 0
    assert m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 100.0
    assert m["test_acc_fp32"] == m["test_acc_torch"] and m["images"] == 128
    assert m["opset"] >= 17 and m["exporter"] == "dynamo" and m["isa"] == cpu_isa()["isa"]
    assert "top-1 agreement 100.00%" in out


def test_dynamic_batch_axis(exported):
    model, _, path = exported
    sess = session(path)
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic: any batch size
    for b in (1, 3, 64):
        x = torch.randn(b, 3, 32, 32)
        got, _ = ort_logits(sess, [(x, torch.zeros(b))])
        with torch.no_grad():
            assert (got - model(x)).abs().max() < 1e-4


def test_opset_17_goes_through_the_torchscript_exporter(exported, tmp_path):
    import onnx

    model, data, _ = exported
    path = export_onnx(model, tmp_path / "m17.onnx", data.image_shape, opset=17)
    assert [o.version for o in onnx.load(str(path)).opset_import if o.domain == ""] == [17]
    x = torch.randn(5, 3, 32, 32)
    got, _ = ort_logits(session(path), [(x, torch.zeros(5))])
    with torch.no_grad():
        assert (got - model(x)).abs().max() < 1e-4


def test_pruned_and_fused_checkpoints_export(entry, trained, tmp_path):
    prune_cfg = {"ckpt": str(trained), "pruner": {"name": "normal", "percent": 0.3}}
    prune_task.run(prune_cfg, tmp_path / "prune")
    fuse_task.run({"ckpt": str(tmp_path / "prune" / "pruned.pt")}, tmp_path / "fuse")
    fused = tmp_path / "fuse" / "fused.pt"
    state = load_checkpoint(fused)
    assert state["widths"] and state["fused"]  # pruned, then fused
    code, _, err = entry("export.py", f"ckpt={fused}", "latency=false", run_dir=tmp_path / "x")
    assert code == 0, err
    m = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert m["pruned"] and m["fused"]
    assert m["max_abs_diff"] < 1e-4 and m["top1_agreement"] == 100.0


@pytest.mark.parametrize(
    "method",
    # entropy: about 10 s of histogram search alone (make test-slow)
    ["minmax", "percentile", pytest.param("entropy", marks=pytest.mark.slow)],
)
def test_ptq_int8_agrees_with_fp32(exported, tmp_path, method):
    _, data, path = exported
    reader = ImageCalibrationReader(calibration_loader(data, 4, 32), "input", 4)
    q = quantize_int8(path, tmp_path / "int8.onnx", reader, method)
    assert reader.images == 128
    loader = eval_loader(data, torch.device("cpu"))
    ref, labels = ort_logits(session(path), loader)
    got, _ = ort_logits(session(q), loader)
    assert agreement(ref, got)["top1_agreement"] >= 95.0
    assert q.stat().st_size < path.stat().st_size
    qdq = qdq_summary(q)
    assert qdq["quantize_linear"] > 0 and qdq["dequantize_linear"] > 0
    # every conv and the classifier: int8 weights with one scale per output channel
    assert qdq["int8_weights"] == qdq["per_channel_weights"] == 20


class _SharedHeadFloat(nn.Module):
    """One conv + GroupNorm head and one prediction conv applied to five levels (an FPN
    detector's shared head: the smallest case found on which quantize_static refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(32, 32, 3, stride=2, padding=1) for _ in range(4))
        self.head = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(32, 32), nn.ReLU())
        self.out = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x):
        levels = [torch.relu(self.stem(x))]
        for down in self.downs:
            levels.append(down(levels[-1]))
        return torch.cat([self.out(self.head(f)).flatten(1) for f in levels], 1)


def test_a_weight_shared_by_several_nodes_is_untied_for_static_int8(tmp_path):
    """ORT's quantize_static refuses initializers shared by several nodes here; untied (one copy
    per use: the convs' weights and biases, GroupNorm's constants) the model computes the same
    and calibrates, every conv call with int8 weights of its own."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from compress.deploy.ptq import untie_shared_weights

    torch.manual_seed(0)
    model = _SharedHeadFloat().eval()
    path = export_onnx(model, tmp_path / "m.onnx", (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x}])

        def get_next(self):
            return next(self.batches, None)

    with pytest.raises(ValueError, match="shared mode is not supported for weight"):
        quantize_static(str(path), str(tmp_path / "refused.onnx"), Reader())
    untied = tmp_path / "untied.onnx"
    copies = untie_shared_weights(path, untied)
    assert copies >= 4 * 4  # head and out: weight and bias for their 2nd to 5th calls, at least
    names = [i.name for i in onnx.load(str(untied)).graph.initializer]
    assert "head.0.weight__use2" in names and len(names) == len(set(names))
    want = session(path).run(None, {"input": x})[0]
    assert np.array_equal(session(untied).run(None, {"input": x})[0], want)
    assert untie_shared_weights(untied, tmp_path / "again.onnx") == 0  # nothing shared left
    q = quantize_int8(path, tmp_path / "int8.onnx", Reader())
    # stem, 4 downs, head and out once a level (15 convs) and GroupNorm's scale once a level
    assert qdq_summary(q)["int8_weights"] == 20
    got = session(q).run(None, {"input": x})[0]
    assert abs(got - want).max() < 0.1 * abs(want).max()


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_calibrate_entry_writes_int8_model_and_metrics(entry, trained, tmp_path):
    code, out, err = entry(
        "calibrate.py",
        f"ckpt={trained}",
        "calib.method=entropy",
        "calib.batches=2",
        "calib.batch_size=16",
        run_dir=tmp_path,
    )
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model_int8.onnx").is_file()
    assert m["calib_images"] == 32 and m["calib_method"] == "entropy" and m["bn_folded"] == 19
    assert m["int8_bytes"] < m["onnx_bytes"] and m["int8_top1_agreement"] >= 95.0
    assert abs(m["test_acc_int8"] - m["test_acc_fp32"]) <= 5.0
    for b in (1, 64):
        assert m[f"latency_ms_bs{b}_int8"] > 0 and m[f"speedup_bs{b}"] > 0
    assert m["isa"] in ("amx", "avx512_vnni", "avx_vnni", "avx512f", "avx2", "unknown")
    assert "test accuracy (%)" in out and "ORT latency bs=64" in out


def test_cpu_isa_reads_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("model name\t: Test CPU\nflags\t\t: fpu sse4_1 avx2 avx512f avx512_vnni\n")
    assert cpu_isa(info) == {
        "isa": "avx512_vnni",
        "cpu_flags": ["avx512_vnni", "avx512f", "avx2"],
        "cpu": "Test CPU",
    }
    assert cpu_isa(tmp_path / "missing")["isa"] == "unknown"


# ---------------------------------------------------------------- bad input: one line each
@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        ("calibrate.py", "calib.batches=0", "calib.batches=0 is invalid: expected an integer >= 1"),
        ("calibrate.py", "calib.method=kl", "calib.method='kl' is invalid"),
        ("export.py", "format=tensorrt", "format=tensorrt is not built yet"),
        ("calibrate.py", "format=openvino", "format=openvino is not built yet"),
        ("export.py", "device=cuda", "device='cuda' is invalid"),
    ],
)
def test_bad_config_is_one_line(entry, tmp_path, script, override, message):
    code, _, err = entry(script, "ckpt=nowhere.pt", override, run_dir=tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["export.py", "calibrate.py"])
def test_missing_runtime_says_how_to_install(entry, tmp_path, monkeypatch, script):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code, _, err = entry(script, "ckpt=nowhere.pt", run_dir=tmp_path)
    assert code == 2 and "onnxruntime is not installed: pip install -e '.[deploy]'" in err


def test_calibrate_refuses_a_fake_quant_checkpoint(entry, trained, tmp_path):
    state = load_checkpoint(trained)
    model = quantize_(model_from_checkpoint(state), W4A4)
    qat = save_checkpoint(tmp_path / "qat.pt", checkpoint_state(model, config=state["config"]))
    code, _, err = entry("calibrate.py", f"ckpt={qat}", run_dir=tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "calibrate.py takes an fp32, pruned or fused checkpoint" in err
    assert "quant=w4a4" in err and "export.py" in err


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y  # branches on data: torch.export cannot trace it


def test_a_model_the_exporter_cannot_express_is_named(tmp_path):
    with pytest.raises(ExportError, match="cannot express DataDependent: .*data-dependent"):
        export_onnx(DataDependent(), tmp_path / "m.onnx", (3, 8, 8))
