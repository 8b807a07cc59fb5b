"""The export task: write checkpoint `cfg["ckpt"]` (float, pruned, fused, or fake-quant) in
`cfg["format"]` and prove it in that runtime: max |logit diff| and top-1 agreement with PyTorch
on the test set, accuracy, file size, latency at batch 1 and 64 against PyTorch eager.

format=onnx: `model.onnx`, run in ONNX Runtime. format=openvino: `model.xml` + `model.bin`
(OpenVINO IR converted from the same `model.onnx`), run by OpenVINO's CPU plugin in f32.
format=ncnn: `model.ncnn.param` + `model.ncnn.bin` (pnnx, from the ONNX graph; the ONNX file
itself is not kept), run by ncnn one image at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress.checkpoint import load_checkpoint
from compress.cli import write_json
from compress.deploy.ncnn_export import (
    PARAM,
    export_ncnn,
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
    ort_latency_ms,
    ort_logits,
    require,
    session,
)
from compress.deploy.openvino_export import (
    XML,
    compile_cpu,
    export_openvino,
    ir_bytes,
    ov_latency_ms,
    ov_logits,
)
from compress.errors import ConfigError, check_choice
from compress.metrics import latency_ms
from compress.quant.api import applied_label
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import eval_loader, load_data, logits_on, source_dataset_cfg

BATCHES = (1, 64)


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
    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError(f"ckpt is required: python {script} ckpt=RUN/best.pt")
    return run_dir, load_checkpoint(cfg["ckpt"])


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
    model: torch.nn.Module, data: Any, loader: Any, path: Path, cfg: dict[str, Any]
) -> tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]:
    """Export `model` to `path`, run it in ORT over `loader` and compare with PyTorch.

    Returns the session, the metrics, ORT's logits and the labels."""
    model.cpu().eval()
    torch_logits, labels = logits_on(model, loader)
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
    model: torch.nn.Module, data: Any, loader: Any, run_dir: Path, cfg: dict[str, Any]
) -> tuple[Any, Callable[..., float], dict[str, Any], torch.Tensor]:
    """Export `model` in format openvino or ncnn under `run_dir`, run it in its runtime over
    `loader` and compare with PyTorch.

    Returns the loaded model, its latency timer, the metrics and the labels."""
    fmt = cfg["format"]
    model.cpu().eval()
    torch_logits, labels = logits_on(model, loader)
    name = f"{arch_name(model.arch)} ({cfg.get('ckpt')})"
    opset, dynamo = int(cfg.get("opset", DEFAULT_OPSET)), bool(cfg.get("dynamo", True))
    if fmt == "openvino":
        onnx = export_onnx(model, run_dir / "model.onnx", data.image_shape, opset, dynamo, name)
        path = export_openvino(onnx, run_dir / XML, name)
        loaded, timer, size = compile_cpu(path), ov_latency_ms, ir_bytes(path)
        got, _ = ov_logits(loaded, loader)
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


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    check_common(cfg, BUILT)
    fmt = cfg.get("format", "onnx")
    run_dir, state = load_source(cfg, run_dir, "export.py")
    model = model_from_checkpoint(state)
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    loader = eval_loader(data, torch.device("cpu"))
    if fmt == "onnx":
        sess, checked, _, labels = export_checked(model, data, loader, run_dir / "model.onnx", cfg)
        timer: Callable[..., float] = ort_latency_ms
    else:
        sess, timer, checked, labels = runtime_checked(model, data, loader, run_dir, cfg)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "fused": bool(state.get("fused")),
        "pruned": bool(state.get("widths")),
        "format": fmt,
        **onnx_exporter(cfg),
        "images": len(labels),
        **checked,
        **cpu_isa(),
    }
    if cfg.get("latency", True):
        metrics.update(latencies({"fp32": sess}, data.image_shape, model, timer))
        tag = "ort" if fmt == "onnx" else fmt
        for b in BATCHES:
            metrics[f"speedup_bs{b}_{tag}_vs_torch"] = (
                metrics[f"latency_ms_bs{b}_torch"] / metrics[f"latency_ms_bs{b}_fp32"]
            )
    metrics["test_acc"] = metrics["best_test_acc"] = metrics["test_acc_fp32"]
    write_json(run_dir / "metrics.json", metrics)
    return metrics


RUNTIME_NAMES = {"onnx": "ORT", "openvino": "OpenVINO", "ncnn": "ncnn"}


def table(m: dict[str, Any]) -> str:
    fmt = m.get("format", "onnx")
    rt = RUNTIME_NAMES[fmt]
    if fmt == "onnx":
        head = (
            f"{m['model']} ({m['quant']}) -> ONNX opset {m['opset']} ({m['exporter']} exporter), "
            f"{m['onnx_bytes']} bytes"
        )
    elif fmt == "openvino":
        head = (
            f"{m['model']} ({m['quant']}) -> OpenVINO IR (from ONNX opset {m['opset']}, "
            f"{m['exporter']} exporter), {m['openvino_bytes']} bytes: {m['model_file']}"
        )
    else:
        head = (
            f"{m['model']} ({m['quant']}) -> ncnn (pnnx), {m['ncnn_bytes']} bytes: "
            f"{m['model_file']}"
        )
    lines = [
        head,
        f"max |logit diff| {rt} vs PyTorch {m['max_abs_diff']:.2e} over {m['images']} test "
        f"images, top-1 agreement {m['top1_agreement']:.2f}%",
        f"test accuracy: PyTorch {m['test_acc_torch']:.2f}%, {rt} {m['test_acc_fp32']:.2f}%",
    ]
    if "latency_ms_bs1_fp32" in m:
        lines.append(
            f"{'':22s}{'PyTorch ms':>12s}{rt + ' ms':>{max(10, len(rt) + 5)}s}{'speed-up':>10s}"
        )
    for b in BATCHES if "latency_ms_bs1_fp32" in m else ():
        t, o = m[f"latency_ms_bs{b}_torch"], m[f"latency_ms_bs{b}_fp32"]
        w = max(10, len(rt) + 5)
        lines.append(f"{f'latency bs={b}':22s}{t:>12.2f}{o:>{w}.2f}{t / o:>9.2f}x")
    lines.append(f"CPU: {m['cpu']} (int8 ISA: {m['isa']})")
    return "\n".join(lines)
