"""The export task: write checkpoint `cfg["ckpt"]` (float, pruned, fused, or fake-quant) in
`cfg["format"]` and prove it in that runtime: max |logit diff| and top-1 agreement with PyTorch
on the test set, accuracy, file size, latency at batch 1 and 64 against PyTorch eager.

A QAT checkpoint (quant=...) whose quantizers all have an 8-bit integer form (int8_qat, DoReFa /
PACT with k <= 7-bit weights, ternary, binary; compress.deploy.qdq) is written as an integer
model, `model_int8.onnx`: its quantizers as Q / DQ pairs, which ONNX Runtime and OpenVINO run as
integer convolutions; it is checked against the fake-quant PyTorch model and timed against the
same architecture in fp32 in the same runtime (`model_fp32.onnx`). `int8=false` writes the
fake-quant float graph instead; `int8=true` refuses a model that has no integer form.

format=onnx: `model.onnx`, run in ONNX Runtime. format=openvino: `model.xml` + `model.bin`
(OpenVINO IR converted from the same ONNX graph), run by OpenVINO's CPU plugin (f32, or int8
for an integer model).
format=ncnn: `model.ncnn.param` + `model.ncnn.bin` (pnnx, from the ONNX graph; the ONNX file
itself is not kept), run by ncnn one image at a time; a QAT model's integer convs become ncnn
int8 layers (compress.deploy.ncnn_export.export_ncnn_int8)."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.cli import write_json
from compress.deploy.ncnn_export import (
    PARAM,
    export_ncnn,
    export_ncnn_int8,
    load_net,
    ncnn_bytes,
    ncnn_latency_ms,
    ncnn_logits,
)
from compress.deploy.onnx_export import (
    BUILT,
    DEFAULT_OPSET,
    accuracy,
    agreement,
    check_format,
    cpu_isa,
    export_onnx,
    exporter_name,
    file_size,
    ort_kernels,
    ort_latency_ms,
    ort_logits,
    require,
    session,
)
from compress.deploy.openvino_export import (
    XML,
    compile_cpu,
    export_openvino,
    int8_layers,
    ir_bytes,
    ov_latency_ms,
    ov_logits,
)
from compress.deploy.ptq import calibration_loader
from compress.deploy.qdq import QDQError, to_qdq
from compress.detection.metrics import DetectionMAP
from compress.detection.runtime import (
    CoreOutputs,
    RuntimeDetector,
    box_agreement,
    check_exportable,
    output_keys,
)
from compress.errors import ConfigError, check, check_choice
from compress.fuse import fuse_bn_
from compress.metrics import latency_ms
from compress.quant.api import applied_label, is_quantized, to_float
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import (
    eval_loader,
    is_detection,
    load_data,
    logits_on,
    read_source,
    source_dataset_cfg,
)

BATCHES = (1, 64)
log = logging.getLogger(__name__)


# the packages each format needs, in the order they are checked
RUNTIMES = {
    "onnx": ("onnxruntime", "onnx"),
    "openvino": ("openvino", "onnx"),
    "ncnn": ("ncnn", "pnnx", "onnx"),
}


def check_common(cfg: dict[str, Any], formats: tuple[str, ...] = ("onnx",)) -> None:
    """The checks both deploy tasks make before loading anything: format (calibrate.py: onnx;
    export.py: every built one), device, runtime."""
    fmt = cfg.get("format", "onnx")
    check_format(fmt, formats)
    check_choice("device", cfg.get("device", "cpu"), ("cpu",))
    for module in RUNTIMES[fmt]:
        require(module)
    if cfg.get("dynamo", True):
        require("onnxscript")


def load_source(cfg: dict[str, Any], run_dir: str | Path, script: str) -> tuple[Path, dict]:
    """Create the run directory and load the checkpoint `ckpt` names (fused ones too)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, read_source(cfg, script, int(cfg.get("seed", 0)))


def latencies(
    sessions: dict[str, Any],
    image_shape: tuple[int, ...],
    model: torch.nn.Module | None = None,
    timer: Callable[..., float] = ort_latency_ms,
) -> dict[str, float]:
    """Median ms per run at batch 1 and 64: `latency_ms_bs{b}_{tag}` for each session (ORT, or
    the runtime `timer` times) and `..._torch` for PyTorch eager when `model` is given."""
    out = {}
    for b in BATCHES:
        reps = 20 if b == 1 else 5
        if model is not None:
            out[f"latency_ms_bs{b}_torch"] = latency_ms(model, image_shape, b, reps)
        for tag, sess in sessions.items():
            out[f"latency_ms_bs{b}_{tag}"] = timer(sess, image_shape, b, reps)
    return out


def export_checked(
    model: torch.nn.Module,
    data: Any,
    loader: Any,
    path: Path,
    cfg: dict[str, Any],
    reference: torch.nn.Module | None = None,
) -> tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]:
    """Export `model` to `path`, run it in ORT over `loader` and compare with PyTorch
    (`reference`, the model itself by default).

    Returns the session, the metrics, ORT's logits and the labels."""
    model.cpu().eval()
    torch_logits, labels = logits_on((reference or model).cpu().eval(), loader)
    export_onnx(
        model,
        path,
        data.image_shape,
        opset=int(cfg.get("opset", DEFAULT_OPSET)),
        dynamo=bool(cfg.get("dynamo", True)),
        name=f"{arch_name(model.arch)} ({cfg.get('ckpt')})",
    )
    sess = session(path)
    onnx_logits, _ = ort_logits(sess, loader)
    metrics = {
        **agreement(torch_logits, onnx_logits),
        "test_acc_torch": accuracy(torch_logits, labels),
        "test_acc_fp32": accuracy(onnx_logits, labels),
        "onnx_bytes": file_size(path),
    }
    return sess, metrics, onnx_logits, labels


def runtime_checked(
    model: torch.nn.Module,
    data: Any,
    loader: Any,
    run_dir: Path,
    cfg: dict[str, Any],
    reference: torch.nn.Module | None = None,
) -> tuple[Any, Callable[..., float], dict[str, Any], torch.Tensor]:
    """Export `model` in format openvino or ncnn under `run_dir`, run it in its runtime over
    `loader` and compare with PyTorch (`reference`, the model itself by default).

    Returns the loaded model, its latency timer, the metrics and the labels."""
    fmt = cfg["format"]
    model.cpu().eval()
    torch_logits, labels = logits_on((reference or model).cpu().eval(), loader)
    name = f"{arch_name(model.arch)} ({cfg.get('ckpt')})"
    opset, dynamo = int(cfg.get("opset", DEFAULT_OPSET)), bool(cfg.get("dynamo", True))
    if fmt == "openvino":
        onnx_name = "model_int8.onnx" if cfg.get("_int8") else "model.onnx"
        onnx = export_onnx(model, run_dir / onnx_name, data.image_shape, opset, dynamo, name)
        path = export_openvino(onnx, run_dir / XML, name)
        loaded, timer, size = compile_cpu(path), ov_latency_ms, ir_bytes(path)
        got, _ = ov_logits(loaded, loader)
        layers = {"openvino_layer_precisions": int8_layers(loaded)}
    else:
        layers = {}
        if cfg.get("_int8"):  # the integer convs as ncnn int8 layers, the rest fp32
            path, done = export_ncnn_int8(
                model, run_dir / PARAM, data.image_shape, name, opset, dynamo
            )
            layers = {
                "ncnn_int8_layers": len(done["int8_layers"]),
                "ncnn_fp32_layers": done["fp32_layers"],
            }
        else:
            path = export_ncnn(model, run_dir / PARAM, data.image_shape, name, opset, dynamo)
        loaded, timer, size = load_net(path), ncnn_latency_ms, ncnn_bytes(path)
        got, _ = ncnn_logits(loaded, loader)
    metrics = {
        **agreement(torch_logits, got),
        "test_acc_torch": accuracy(torch_logits, labels),
        "test_acc_fp32": accuracy(got, labels),
        f"{fmt}_bytes": size,
        "model_file": str(path),
        "runtime": fmt,
        "runtime_version": runtime_version(fmt),
        **layers,
    }
    return loaded, timer, metrics, labels


def runtime_version(fmt: str) -> str:
    if fmt == "openvino":
        return require("openvino").get_version()
    if fmt == "ncnn":
        return f"ncnn {require('ncnn').__version__}, pnnx {require('pnnx').__version__}"
    return require("onnxruntime").__version__


def onnx_exporter(cfg: dict[str, Any]) -> dict[str, Any]:
    """The opset and exporter of the ONNX graph every format goes through."""
    opset = int(cfg.get("opset", DEFAULT_OPSET))
    return {"opset": opset, "exporter": exporter_name(opset, cfg.get("dynamo", True))}


def int8_choice(cfg: dict[str, Any]) -> str | bool:
    value = cfg.get("int8", "auto")
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(f"int8={value!r} is invalid: expected auto, true or false")
    return value


REQUANT_BATCH_SIZE = 32


def requant_batches(cfg: dict[str, Any]) -> int:
    n = cfg.get("requant_batches", 4)
    check(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0,
        "requant_batches",
        n,
        "an integer >= 0",
    )
    return n


def integer_model(
    model: torch.nn.Module, state: dict[str, Any], cfg: dict[str, Any], data: Any
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The QDQ form of a QAT model when the export writes one (None otherwise), and metrics
    saying which and why."""
    choice, fmt = int8_choice(cfg), cfg.get("format", "onnx")
    if not is_quantized(state.get("quant")) or choice is False:
        return None, {"int8": False}
    opset = int(cfg.get("opset", DEFAULT_OPSET))
    if exporter_name(opset, bool(cfg.get("dynamo", True))) != "dynamo":
        why = "the integer model needs the dynamo exporter (dynamo=true, opset >= 18)"
        if choice is True:
            raise ConfigError(f"int8=true: {why}")
        return None, {"int8": False, "int8_skipped": why}
    n = requant_batches(cfg)
    calib = None
    if n and fmt != "ncnn":  # ncnn: an added 8-bit range would stay fp32 there anyway
        seed = int(cfg.get("seed", 0))
        loader = calibration_loader(data, n, REQUANT_BATCH_SIZE, seed, key="requant_batches")
        calib = (x for x, _ in loader)
    return qdq_or_float(model, calib, choice)


def qdq_or_float(
    model: torch.nn.Module, calib: Any, choice: str | bool
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """to_qdq, or None (the fake-quant float graph is written) with why, unless int8=true."""
    try:
        qdq, report = to_qdq(model, calib)
    except QDQError as e:
        if choice is True:
            raise ConfigError(f"int8=true: {e}") from None
        log.warning("export: writing the fake-quant float graph: %s", e)
        return None, {"int8": False, "int8_skipped": str(e)}
    return qdq, {"int8": True, **report.as_metrics()}


def fp32_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture in fp32 (quantizers removed, BNs folded): the baseline an integer
    model's speed is measured against."""
    twin = to_float(copy.deepcopy(model).cpu().eval())
    fuse_bn_(twin)
    return twin


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    check_common(cfg, BUILT)
    int8_choice(cfg)
    requant_batches(cfg)
    fmt = cfg.get("format", "onnx")
    run_dir, state = load_source(cfg, run_dir, "export.py")
    model = model_from_checkpoint(state)
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    if is_detection(data):
        return run_detection(cfg, run_dir, state, model, data)
    loader = eval_loader(data, torch.device("cpu"))
    qdq, int8 = integer_model(model, state, cfg, data)
    deployed = model if qdq is None else qdq
    cfg = {**cfg, "_int8": qdq is not None}
    if fmt == "onnx":
        path = run_dir / ("model.onnx" if qdq is None else "model_int8.onnx")
        sess, checked, _, labels = export_checked(deployed, data, loader, path, cfg, model)
        timer: Callable[..., float] = ort_latency_ms
        if qdq is not None:
            checked["model_file"] = str(path)
            checked["int8_bytes"] = checked["onnx_bytes"]
            checked["kernels"] = ort_kernels(path)
    else:
        sess, timer, checked, labels = runtime_checked(deployed, data, loader, run_dir, cfg, model)
    tag = "int8" if qdq is not None else "fp32"
    if qdq is not None:
        checked[f"test_acc_{tag}"] = checked.pop("test_acc_fp32")
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "fused": bool(state.get("fused")),
        "pruned": bool(state.get("widths")),
        "format": fmt,
        **onnx_exporter(cfg),
        "images": len(labels),
        **int8,
        **checked,
        **cpu_isa(),
    }
    if cfg.get("latency", True):
        sessions = {tag: sess}
        if qdq is not None:  # the same architecture in fp32, same runtime: the speed-up's base
            sessions["fp32"] = fp32_session(fp32_twin(model), data, run_dir, cfg)
        metrics.update(latencies(sessions, data.image_shape, model, timer))
        rt = "ort" if fmt == "onnx" else fmt
        for b in BATCHES:
            ms = metrics[f"latency_ms_bs{b}_{tag}"]
            metrics[f"speedup_bs{b}_{rt}_vs_torch"] = metrics[f"latency_ms_bs{b}_torch"] / ms
            if qdq is not None:
                metrics[f"speedup_bs{b}_int8_vs_fp32"] = metrics[f"latency_ms_bs{b}_fp32"] / ms
    metrics["test_acc"] = metrics["best_test_acc"] = metrics[f"test_acc_{tag}"]
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def run_detection(
    cfg: dict[str, Any], run_dir: Path, state: dict[str, Any], model: torch.nn.Module, data: Any
) -> dict[str, Any]:
    """A detector: its core as `model.onnx` (raw head outputs), run in ONNX Runtime with the
    detector's own decoding and NMS in Python (compress.detection.runtime), checked against
    PyTorch on the val set: raw outputs, boxes (pixels), mAP in each."""
    name = f"{arch_name(model.arch)} ({cfg.get('ckpt')})"
    fmt = cfg.get("format", "onnx")
    if fmt not in ("onnx", "openvino"):
        raise ConfigError(f"format={fmt}: a detector's core exports as onnx or openvino so far")
    check_exportable(model, name)
    model.cpu().eval()
    keys = output_keys(model, data.image_size)
    opset, dynamo = int(cfg.get("opset", DEFAULT_OPSET)), bool(cfg.get("dynamo", True))
    core = CoreOutputs(model, keys).eval()  # the reference: fake-quant where quantized
    qdq, int8 = integer_core(model, core, state, cfg, data)
    path = run_dir / ("model.onnx" if qdq is None else "model_int8.onnx")
    export_onnx(core if qdq is None else qdq, path, data.image_shape, opset, dynamo, name)
    if fmt == "onnx":
        sess, timer, size = session(path), ort_latency_ms, file_size(path)
        run_core = ort_core(sess)
    else:  # the IR converted from the same ONNX graph, run by OpenVINO's CPU plugin
        xml = export_openvino(path, run_dir / XML, name)
        sess, timer, size = compile_cpu(xml), ov_latency_ms, ir_bytes(xml)
        run_core = ov_core(sess)
        path = xml
    checked = detection_checked(model, core, run_core, data)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "fused": bool(state.get("fused")),
        "pruned": bool(state.get("widths")),
        "format": fmt,
        **onnx_exporter(cfg),
        "exported": "core (raw head outputs); decoding and NMS in Python",
        **int8,
        **({"kernels": ort_kernels(path)} if qdq is not None and fmt == "onnx" else {}),
        "runtime": fmt,
        "runtime_version": runtime_version(fmt),
        **checked,
        "map": checked["map_runtime"],
        "best_map": checked["map_runtime"],
        f"{fmt}_bytes": size,
        "model_file": str(path),
        **cpu_isa(),
    }
    if cfg.get("latency", True):  # the core, batch 1 and 64, against PyTorch eager's core
        tag = "fp32" if qdq is None else "int8"
        sessions = {tag: sess}
        if qdq is not None:  # the same core in fp32, same runtime: the speed-up's base
            twin = CoreOutputs(fp32_twin(model), keys).eval()
            onnx32 = export_onnx(twin, run_dir / "model_fp32.onnx", data.image_shape, opset, dynamo)
            if fmt == "onnx":
                sessions["fp32"] = session(onnx32)
            else:
                sessions["fp32"] = compile_cpu(export_openvino(onnx32, run_dir / "model_fp32.xml"))
        metrics.update(latencies(sessions, data.image_shape, core, timer))
        if qdq is not None:
            for b in BATCHES:
                ratio = metrics[f"latency_ms_bs{b}_fp32"] / metrics[f"latency_ms_bs{b}_int8"]
                metrics[f"speedup_bs{b}_int8_vs_fp32"] = ratio
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def ort_core(sess: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """An ORT session of a detector core as RuntimeDetector's `run_core`."""
    feed = sess.get_inputs()[0].name

    def run_core(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = sess.run(None, {feed: x.detach().cpu().numpy().astype("float32")})
        return tuple(torch.from_numpy(o) for o in outs)

    return run_core


def ov_core(compiled: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """A compiled OpenVINO model of a detector core as RuntimeDetector's `run_core`."""

    def run_core(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        res = compiled(x.detach().cpu().numpy().astype("float32"))
        return tuple(torch.from_numpy(res[out].copy()) for out in compiled.outputs)

    return run_core


def detection_checked(
    model: torch.nn.Module, core: torch.nn.Module, run_core: Any, data: Any
) -> dict[str, Any]:
    """A detector core run elsewhere (`run_core`: ORT, OpenVINO) against `core` (PyTorch) over
    the val set: the largest raw output difference (relative to the largest output), the images
    whose decoded detections match and their largest box distance in pixels, and mAP in
    PyTorch and in the runtime."""
    runtime = RuntimeDetector(model, run_core, core.keys)
    loader = eval_loader(data, torch.device("cpu"))
    raw, same, worst, images = 0.0, 0, 0.0, 0
    maps = {"torch": DetectionMAP(), "runtime": DetectionMAP()}  # in the same single pass
    model.eval()
    with torch.no_grad():
        for batch, targets in loader:
            x = model.transform(batch)[0].tensors
            for a, b in zip(core(x), run_core(x), strict=True):
                raw = max(raw, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
            want, got = model(batch), runtime(batch)
            maps["torch"].update(want, targets)
            maps["runtime"].update(got, targets)
            n, w = box_agreement(want, got)
            same, worst, images = same + n, max(worst, w), images + len(batch)
    return {
        "images": images,
        "max_rel_diff": raw,
        "images_same_detections": same,
        "max_box_diff_px": worst,
        "map_torch": maps["torch"].compute()["map"],
        "map_runtime": maps["runtime"].compute()["map"],
    }


def integer_core(
    model: torch.nn.Module,
    core: torch.nn.Module,
    state: dict[str, Any],
    cfg: dict[str, Any],
    data: Any,
) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    """The QDQ form of a quantized detector's `core` (None for a float one, or int8=false),
    with 8-bit ranges for what QAT left float from `requant_batches` training batches (as the
    detector's transform makes them)."""
    choice = int8_choice(cfg)
    if not is_quantized(state.get("quant")) or choice is False:
        return None, {"int8": False}
    train, _ = data.loaders(8, 8)
    with torch.no_grad():
        batches = itertools.islice(iter(train), requant_batches(cfg))
        calib = [model.transform(images)[0].tensors for images, _ in batches]
    return qdq_or_float(core, calib, choice)


def fp32_session(model: torch.nn.Module, data: Any, run_dir: Path, cfg: dict[str, Any]) -> Any:
    """`model` exported to `model_fp32.onnx` and loaded in the runtime of `cfg["format"]`."""
    opset, dynamo = int(cfg.get("opset", DEFAULT_OPSET)), bool(cfg.get("dynamo", True))
    if cfg.get("format", "onnx") == "ncnn":
        return load_net(export_ncnn(model, run_dir / "model_fp32.ncnn.param", data.image_shape))
    path = export_onnx(model, run_dir / "model_fp32.onnx", data.image_shape, opset, dynamo)
    if cfg.get("format", "onnx") == "openvino":
        return compile_cpu(export_openvino(path, run_dir / "model_fp32.xml"))
    return session(path)


RUNTIME_NAMES = {"onnx": "ORT", "openvino": "OpenVINO", "ncnn": "ncnn"}


def table(m: dict[str, Any]) -> str:
    if "map_runtime" in m:
        return detection_table(m)
    fmt = m.get("format", "onnx")
    rt = RUNTIME_NAMES[fmt]
    int8 = bool(m.get("int8"))
    tag = "int8" if int8 else "fp32"
    kind = "integer (QDQ) " if int8 else ""
    if fmt == "onnx":
        head = (
            f"{m['model']} ({m['quant']}) -> {kind}ONNX opset {m['opset']} ({m['exporter']} "
            f"exporter), {m['onnx_bytes']} bytes"
        )
    elif fmt == "openvino":
        head = (
            f"{m['model']} ({m['quant']}) -> {kind}OpenVINO IR (from ONNX opset {m['opset']}, "
            f"{m['exporter']} exporter), {m['openvino_bytes']} bytes: {m['model_file']}"
        )
    else:
        head = (
            f"{m['model']} ({m['quant']}) -> {'int8 ' if int8 else ''}ncnn (pnnx), "
            f"{m['ncnn_bytes']} bytes: "
            f"{m['model_file']}"
        )
    lines = [head]
    if int8:
        requant = m.get("qdq_requantized_layers", 0)
        requant_in = m.get("qdq_requantized_inputs", 0)
        parts = [f"{requant} with an 8-bit output"] if requant else []
        parts += [f"{requant_in} with an 8-bit input"] if requant_in else []
        added = (
            f" ({' and '.join(parts)} the QAT model did not have, ranges from "
            f"{m['qdq_calib_images']} training images)"
            if parts
            else ""
        )
        lines.append(
            f"integer layers: {m['qdq_integer_layers']}{added}, float layers: "
            + (", ".join(f"{k} ({v})" for k, v in m["qdq_float_layers"].items()) or "none")
        )
        if "kernels" in m:
            counts = ", ".join(f"{k} {v}" for k, v in m["kernels"].items() if "Conv" in k)
            lines.append(f"ORT kernels after its graph optimizations: {counts}")
        if "ncnn_int8_layers" in m:
            fp32 = ", ".join(f"{k} ({v})" for k, v in m["ncnn_fp32_layers"].items()) or "none"
            lines.append(f"ncnn int8 layers: {m['ncnn_int8_layers']}, fp32: {fp32}")
        if "openvino_layer_precisions" in m:
            counts = ", ".join(f"{k} {v}" for k, v in m["openvino_layer_precisions"].items())
            lines.append(f"OpenVINO conv / linear layers by precision: {counts}")
    elif m.get("int8_skipped"):
        lines.append(f"float graph of the fake-quant model: {m['int8_skipped']}")
    ref = "PyTorch (fake-quant)" if m["quant"] != "fp32" else "PyTorch"
    lines += [
        f"max |logit diff| {rt} vs {ref} {m['max_abs_diff']:.2e} over {m['images']} test "
        f"images, top-1 agreement {m['top1_agreement']:.2f}%",
        f"test accuracy: PyTorch {m['test_acc_torch']:.2f}%, {rt} {m[f'test_acc_{tag}']:.2f}%",
    ]
    if "latency_ms_bs1_torch" in m:
        w = max(10, len(rt) + 10)
        cols = [f"{rt} fp32 ms"] + ([f"{rt} int8 ms", "int8/fp32"] if int8 else ["speed-up"])
        torch_col = "PyTorch ms" if m["quant"] == "fp32" else "fake-quant ms"
        lines.append(f"{'':22s}{torch_col:>14s}" + "".join(f"{c:>{w}s}" for c in cols))
        for b in BATCHES:
            cells = [f"{m[f'latency_ms_bs{b}_fp32']:.2f}"]
            t = m[f"latency_ms_bs{b}_torch"]
            if int8:
                i8 = m[f"latency_ms_bs{b}_int8"]
                cells += [f"{i8:.2f}", f"{m[f'latency_ms_bs{b}_fp32'] / i8:.2f}x"]
            else:
                cells.append(f"{t / m[f'latency_ms_bs{b}_fp32']:.2f}x")
            lines.append(
                f"{f'latency bs={b}':22s}{t:>14.2f}" + "".join(f"{c:>{w}s}" for c in cells)
            )
    lines.append(f"CPU: {m['cpu']} (int8 ISA: {m['isa']})")
    return "\n".join(lines)


def detection_table(m: dict[str, Any]) -> str:
    rt = RUNTIME_NAMES[m["format"]]
    into = "ONNX" if m["format"] == "onnx" else "OpenVINO IR (from ONNX"
    lines = [
        f"{m['model']} ({m['quant']}) -> {into} opset {m['opset']} ({m['exporter']} exporter"
        f"{')' if m['format'] != 'onnx' else ''}), {m[m['format'] + '_bytes']} bytes: the core; "
        "decoding and NMS in Python",
        f"raw head outputs: max |diff| {m['max_rel_diff']:.2e} of the largest; "
        f"{m['images_same_detections']} of {m['images']} images with the same detections, "
        f"boxes within {m['max_box_diff_px']:.2e} px",
        f"test mAP: PyTorch {m['map_torch']:.2f}, {rt} {m['map_runtime']:.2f}",
    ]
    if m.get("int8") and "kernels" in m:
        kernels = m["kernels"]
        lines.insert(
            1,
            f"integer core: {kernels.get('QLinearConv', 0)} QLinearConv, "
            f"{kernels.get('Conv', 0)} float Conv in ORT (the first conv, the heads' outputs)",
        )
    for b in BATCHES if "latency_ms_bs1_torch" in m else ():
        ort = ", ".join(
            f"{rt} {tag} {m[f'latency_ms_bs{b}_{tag}']:.2f} ms"
            for tag in ("int8", "fp32")
            if f"latency_ms_bs{b}_{tag}" in m
        )
        lines.append(f"core latency bs={b}: {ort}, PyTorch {m[f'latency_ms_bs{b}_torch']:.2f} ms")
    return "\n".join(lines)
