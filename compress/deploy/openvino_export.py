"""Convert an exported ONNX model to OpenVINO IR (model.xml + model.bin) and run it on the CPU.

`export_openvino` converts the ONNX file `export_onnx` writes (the graph ORT checks, dynamic batch
axis kept) with `openvino.convert_model` and saves fp32 weights. `compile_cpu` compiles it for
the CPU plugin in f32: on CPUs with AMX or AVX512-BF16 the plugin otherwise runs float models in
bf16 (max |logit diff| ~1e-2). An INT8 QDQ ONNX model (`quantize_int8`) compiles as it is: the
plugin's low-precision transformations run its convolutions in int8 (`int8_layers` counts them).
`ov_logits` runs a compiled model over a loader, `ov_latency_ms` times it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.deploy.onnx_export import ExportError, require

XML = "model.xml"


def export_openvino(onnx_path: str | Path, xml_path: str | Path, name: str = "the model") -> Path:
    """Convert `onnx_path` to OpenVINO IR at `xml_path` (the weights go next to it as .bin, fp32).

    A model the converter cannot express becomes an `ExportError` that names it."""
    ov = require("openvino")
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(xml_path), compress_to_fp16=False)
    except Exception as e:  # the frontends raise their own types; all mean "cannot express"
        text = str(e).strip().splitlines()
        reason = next((t for t in text if "OpConversionFailure" in t or "not" in t), "")
        reason = (reason or (text[0] if text else "")).strip()
        raise ExportError(
            f"openvino.convert_model cannot express {name}: {type(e).__name__}: {reason[:300]}"
        ) from None
    return xml_path


def compile_cpu(path: str | Path, threads: int | None = None) -> Any:
    """The model at `path` (IR .xml or ONNX) compiled for OpenVINO's CPU plugin, f32 inference."""
    ov = require("openvino")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(str(path), "CPU", config)


def ov_run(compiled: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.asarray(compiled(np.ascontiguousarray(arr, np.float32))[0])


def ov_logits(compiled: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a compiled OpenVINO model over every batch of `loader`."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(torch.from_numpy(ov_run(compiled, x).copy()).float())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def ov_latency_ms(
    compiled: Any,
    image_shape: tuple[int, ...],
    batch_size: int = 1,
    reps: int = 20,
    warmup: int = 3,
) -> float:
    """Median wall time of one synchronous inference in milliseconds."""
    x = np.random.default_rng(0).standard_normal((batch_size, *image_shape), dtype=np.float32)
    request = compiled.create_infer_request()
    for _ in range(warmup):
        request.infer([x])
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        request.infer([x])
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def int8_layers(compiled: Any) -> dict[str, int]:
    """Layers of the compiled (executed) graph by runtime precision: how many run in int8."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "runtimePrecision" not in info or "layerType" not in info:
            continue
        kind = str(info["layerType"].astype(str))
        prec = str(info["runtimePrecision"].astype(str)).lower()
        if kind in ("Convolution", "FullyConnected", "MatMul", "GroupConvolution"):
            key = "int8" if prec in ("i8", "u8") else prec
            counts[key] = counts.get(key, 0) + 1
    return counts


def ir_bytes(xml_path: str | Path) -> int:
    """Size of the IR: the .xml and its .bin."""
    xml_path = Path(xml_path)
    return xml_path.stat().st_size + xml_path.with_suffix(".bin").stat().st_size
