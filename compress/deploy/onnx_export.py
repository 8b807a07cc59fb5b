"""Export a model to ONNX and check it in ONNX Runtime (CPU) against PyTorch.

`export_onnx` writes opset 18 with a dynamic batch axis through torch.onnx.export's dynamo
exporter (the default, `dynamo=True`; `dynamo=False` takes the TorchScript exporter). Opset 18
is the dynamo exporter's own: asking it for 17 runs onnx's version converter, which fails on
these models (Reduce* axes), so 17 goes through the TorchScript exporter instead.
`session` opens a model in ORT's CPU provider, `ort_logits` runs it over a loader,
`agreement` compares two sets of logits, `ort_latency_ms` times it, and `cpu_isa` reads the
instruction sets that decide ORT's int8 kernels from /proc/cpuinfo.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import CompressError, ConfigError

INSTALL_HINT = "pip install -e '.[deploy]'"
DEFAULT_OPSET = 18
FORMATS = ("onnx",)
BUILT = ("onnx", "openvino", "ncnn")  # the formats export.py writes and checks
NOT_BUILT = ("tensorrt", "tflite")
INPUT, OUTPUT = "input", "logits"
_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx")
_LOGGERS += ("onnxscript", "onnx_ir")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(CompressError):
    """The exporter cannot express the model."""


def require(module: str = "onnxruntime") -> Any:
    """Import a deployment dependency, or one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed: {INSTALL_HINT}") from None


def check_format(fmt: str, formats: tuple[str, ...] = FORMATS) -> None:
    """Accept `fmt` when the calling task has built it: `formats` (calibrate.py: onnx, export.py:
    BUILT); the other runtimes get one line each."""
    if fmt in formats:
        return
    if fmt in BUILT + NOT_BUILT:
        only = " or ".join(f"format={f}" for f in formats)
        elsewhere = f" (python export.py format={fmt} writes it)" if fmt in BUILT else ""
        raise ConfigError(f"format={fmt} is not built yet: only {only} here{elsewhere}")
    later = ", ".join(NOT_BUILT)
    raise ConfigError(f"format={fmt!r} is invalid: expected {', '.join(formats)} ({later}: later)")


def exporter_name(opset: int, dynamo: bool = True) -> str:
    """The exporter `export_onnx` uses: dynamo, except below its own opset (18), where its
    version converter fails on these models and the TorchScript exporter writes the opset."""
    return "dynamo" if dynamo and opset >= DEFAULT_OPSET else "torchscript"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    image_shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
    name: str | None = None,
) -> Path:
    """Write `model` (eval mode, on the CPU) to `path` as ONNX with a dynamic batch axis.

    Any failure of the exporter becomes an `ExportError` that names the model.
    """
    require("onnx")
    if dynamo:
        require("onnxscript")
    if opset < 17:
        raise ConfigError(f"opset={opset} is invalid: expected an ONNX opset >= 17")
    dynamo = exporter_name(opset, dynamo) == "dynamo"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    label = name or type(model).__name__
    x = torch.randn(2, *image_shape)
    kw: dict[str, Any] = {
        "input_names": [INPUT],
        "output_names": [OUTPUT],
        "opset_version": opset,
        "dynamo": dynamo,
    }
    if dynamo:
        kw["dynamic_shapes"] = {_arg_name(model): {0: torch.export.Dim("batch")}}
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(path), **kw)
    except Exception as e:  # the exporters raise many types; all mean "cannot express"
        root = e
        while root.__cause__ is not None:  # the exporter wraps torch.export's own error
            root = root.__cause__
        text = _ANSI.sub("", str(root)).strip()
        reason = text.splitlines()[0] if text else ""
        raise ExportError(
            f"torch.onnx.export ({'dynamo' if dynamo else 'torchscript'}) cannot express "
            f"{label}: {type(root).__name__}: {reason[:300]}"
        ) from None
    return path


def _arg_name(model: nn.Module) -> str:
    params = list(inspect.signature(model.forward).parameters)
    return params[0] if params else "x"


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, logs and warnings (a failure is re-raised as one
    line instead)."""
    names = (
        "torch.onnx",
        "torch.export",
        "torch._export",
        "torch._dynamo",
        "torch.fx",
        "onnxscript",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            _fds_to_devnull(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _fds_to_devnull():
    """File descriptors 1 and 2 to /dev/null: the TorchScript exporter prints its whole graph
    from C++ when it fails."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):  # no real descriptors: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def session(path: str | Path, threads: int | None = None) -> Any:
    """An ORT inference session on the CPU provider, every graph optimization on, no spinning."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # no busy-waiting threads after a run: they would steal the cores of whatever runs next
    # (PyTorch in the same process, a neighbour on a shared machine)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QLinearAdd", "MatMulInteger", "ConvInteger")


def ort_kernels(path: str | Path) -> dict[str, int]:
    """The nodes ORT runs for the model at `path` after its graph optimizations, by op type:
    whether the Q / DQ pairs became integer kernels (QLinearConv, ...) or stayed float."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        # ORT_ENABLE_ALL would add layout nodes of this CPU; the QDQ fusions are in EXTENDED
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    ops = Counter(n.op_type for n in graph.node)
    return dict(sorted(ops.items()))


def ort_run(sess: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    return sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(arr, np.float32)})[0]


def ort_logits(sess: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of an ORT session over every batch of `loader`."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(torch.from_numpy(ort_run(sess, x)).float())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Max |logit diff| and top-1 agreement (%) of `got` against `ref`."""
    return {
        "max_abs_diff": (ref - got).abs().max().item(),
        "top1_agreement": 100.0 * (ref.argmax(1) == got.argmax(1)).float().mean().item(),
    }


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def ort_latency_ms(
    sess: Any, image_shape: tuple[int, ...], batch_size: int = 1, reps: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one ORT run in milliseconds."""
    x = np.random.default_rng(0).standard_normal((batch_size, *image_shape), dtype=np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


ISA_FLAGS = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_isa(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The x86 instruction sets that matter for int8 inference, from /proc/cpuinfo.

    `isa` names the best one: amx (AMX-INT8 tiles), avx512_vnni, avx_vnni (VNNI on 256-bit),
    avx512f / avx2 (int8 through VPMADDUBSW, no VNNI), or unknown.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {"isa": "unknown", "cpu_flags": [], "cpu": "unknown"}
    flags: set[str] = set()
    cpu = "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and cpu == "unknown":
            cpu = value.strip()
    found = [f for f in ISA_FLAGS if f in flags]
    isa = "unknown"
    for name, need in (
        ("amx", "amx_int8"),
        ("avx512_vnni", "avx512_vnni"),
        ("avx_vnni", "avx_vnni"),
        ("avx512f", "avx512f"),
        ("avx2", "avx2"),
    ):
        if need in flags:
            isa = name
            break
    return {"isa": isa, "cpu_flags": found, "cpu": cpu}


def file_size(path: str | Path) -> int:
    return Path(path).stat().st_size
