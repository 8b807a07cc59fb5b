"""Post-training static INT8 quantization with ONNX Runtime (the maintained route; not
torch.ao.quantization, which is deprecated).

`quantize_int8` runs ORT's pre-processing (symbolic shape inference, graph optimization) and
`quantize_static` in the QDQ format: int8 weights, symmetric and per output channel, uint8
activations whose ranges come from calibration (`minmax`, `percentile` or `entropy`) over
`batches` batches of the data set's training images, normalized exactly as `TensorLoader`
normalizes them for training and evaluation.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from compress.data import FolderLoader, TensorLoader
from compress.deploy.onnx_export import _quiet, require
from compress.errors import check, check_choice

log = logging.getLogger(__name__)
METHODS = ("minmax", "percentile", "entropy")
ENTROPY_BINS, ENTROPY_QUANT_BINS = 2048, 128  # TensorRT's entropy calibration

try:  # ORT's reader base class; the module stays importable without ORT
    from onnxruntime.quantization import CalibrationDataReader as _ReaderBase
except ImportError:  # pragma: no cover - the tasks refuse earlier with the install line
    _ReaderBase = object  # type: ignore[assignment,misc]


def validate_calib(calib: dict[str, Any]) -> None:
    check_choice("calib.method", calib.get("method"), METHODS)
    for key in ("batches", "batch_size"):
        v = calib.get(key)
        check(isinstance(v, int) and v >= 1, f"calib.{key}", v, "an integer >= 1")


def calibration_loader(
    data: Any, batches: int, batch_size: int, seed: int = 0, key: str | None = None
) -> Any:
    """`batches` batches of training images, a seeded random subset in evaluation mode (no
    augmentation), normalized as in training. A streamed image folder gives its subset through
    its own loader (its training split's transform).

    More images than the split holds are clamped to all of them with a warning that says so
    (as `dataset.train_subset` is), naming `key` (the option that asked, e.g. calib.batches):
    nobody should believe ranges came from more images than they did."""
    total = len(data.train)
    if batches * batch_size > total:
        asked = f"{key}={batches}" if key else f"{batches} calibration batches"
        log.warning(
            "%s x %d images is more than the %d training images: calibrating on all %d "
            "(%d batches)",
            asked,
            batch_size,
            total,
            total,
            math.ceil(total / batch_size),
        )
    split = data.train.subset(batches * batch_size, seed)
    if hasattr(data, "loaders"):
        return FolderLoader(split, batch_size, data.mean, data.std, "cpu", workers=data.workers)
    return TensorLoader(split, batch_size, data.mean, data.std, "cpu")


class ImageCalibrationReader(_ReaderBase):
    """ORT's CalibrationDataReader over a loader of normalized image batches."""

    def __init__(self, loader: Any, input_name: str, batches: int | None = None) -> None:
        self.loader, self.input_name, self.batches = loader, input_name, batches
        self.images = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for i, (x, _) in enumerate(self.loader):
            if self.batches is not None and i >= self.batches:
                return
            self.images += len(x)
            yield {self.input_name: np.ascontiguousarray(x.cpu().numpy(), np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._feeds()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it, self.images = None, 0


class ArrayCalibrationReader(ImageCalibrationReader):
    """A reader over a list of numpy batches (random or synthetic calibration in benchmarks)."""

    def __init__(self, arrays: list[np.ndarray], input_name: str) -> None:
        super().__init__([(a, None) for a in arrays], input_name)

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for a, _ in self.loader:
            self.images += len(a)
            yield {self.input_name: np.ascontiguousarray(a, np.float32)}


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    reader: Any,
    method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = False,
    preprocess: bool = True,
) -> Path:
    """Static INT8 (QDQ) quantization of an fp32 ONNX model with ORT; returns `out_path`."""
    check_choice("calib.method", method, METHODS)
    require("onnxruntime")
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(fp32_path)
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            with _quiet():
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            src = pre
        untied = Path(tmp) / "untied.onnx"
        if untie_shared_weights(src, untied):
            src = untied
        cache = None
        if method == "entropy":  # ranges computed here: quantize_static cannot set the bins
            cache = _entropy_ranges(src, reader, Path(tmp))
            reader = None
        with _quiet():
            quantize_static(
                str(src),
                str(out_path),
                reader,
                calibration_cache_path=cache,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=calibrate,
                calibration_providers=["CPUExecutionProvider"],
            )
    return out_path


def untie_shared_weights(src: Path, dst: Path) -> int:
    """Give each node its own copy of a float initializer it shares with other nodes (an FPN
    detector's head convs, run once per level, and the GroupNorm constants of its towers),
    written to `dst`: ORT's static quantization refuses a shared one ("Quantization parameter
    shared mode is not supported for weight yet"). Each copy gets its own int8 scales, which
    are the same numbers. Returns the number of copies made (0: nothing shared, `dst` not
    written)."""
    onnx = require("onnx")
    model = onnx.load(str(src))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    inits = {i.name: i for i in model.graph.initializer if i.data_type in floats}
    uses = Counter(i for n in model.graph.node for i in n.input if i in inits)
    seen: Counter[str] = Counter()
    copies = []
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits or uses[name] < 2:
                continue
            seen[name] += 1
            if seen[name] == 1:  # the first user keeps the original
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = f"{name}__use{seen[name]}"
            copies.append(copy)
            node.input[k] = copy.name
    if copies:
        model.graph.initializer.extend(copies)
        onnx.save(model, str(dst))
    return len(copies)


def _entropy_ranges(model: Path, reader: Any, tmp: Path) -> Path:
    """TensorRT's entropy calibration (KL divergence over a 2048-bin histogram, 128 quantized
    bins) with ORT's calibrator, saved as a calibration cache for quantize_static.

    quantize_static passes no histogram sizes to the entropy calibrator, whose defaults (128
    bins, 128 quantized bins) leave one candidate threshold: the full range, i.e. minmax."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with _quiet():
        calibrator = create_calibrator(
            model,
            None,
            augmented_model_path=str(tmp / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            providers=["CPUExecutionProvider"],
            extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANT_BINS},
        )
        calibrator.collect_data(reader)
        cache = tmp / "ranges.json"
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def qdq_summary(path: str | Path) -> dict[str, Any]:
    """What the quantized graph holds: QuantizeLinear / DequantizeLinear counts, the int8
    weight initializers and how many of them are quantized per channel."""
    onnx = require("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    inits = {i.name: i for i in graph.initializer}
    int8_weights = per_channel = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        if w.data_type != onnx.TensorProto.INT8:
            continue
        int8_weights += 1
        scale = inits.get(node.input[1])
        if scale is not None and numpy_helper.to_array(scale).size > 1:
            per_channel += 1
    return {
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "int8_weights": int8_weights,
        "per_channel_weights": per_channel,
        "ops": dict(ops),
    }
