"""Convert a model to ncnn (model.ncnn.param + model.ncnn.bin) with pnnx and run it in ncnn.

`export_ncnn` exports the model to ONNX (`export_onnx`, the graph ORT checks) and runs pnnx's
converter on it at batch 1 (ncnn has no batch axis) with fp32 weights (`fp16=0`; pnnx stores
fp16 by default), keeping the .param/.bin. ONNX rather than pnnx's TorchScript input: the
dynamo exporter takes the fake-quant models' autograd Functions, which `torch.jit.trace` cannot
save (and is deprecated). ncnn has no strided slice, so ResNet's option-A shortcut
(`x[:, :, ::2, ::2]`) is rewritten first as the equal 1x1 max pool with stride 2. An op pnnx
leaves without an ncnn layer becomes an `ExportError` that names the model and the op.
`load_net` opens the files with fp16/bf16 storage and arithmetic off (fp32 throughout),
`ncnn_run` feeds one CHW image at a time (an NCHW batch is a loop), `ncnn_logits` runs a loader
and `ncnn_latency_ms` times a batch.
"""

from __future__ import annotations

import copy
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compress.deploy.onnx_export import DEFAULT_OPSET, ExportError, export_onnx, require
from compress.models.blocks import ChannelShuffle
from compress.models.resnet import Shortcut

PARAM = "model.ncnn.param"
_NCNN_TYPE = re.compile(r"^[A-Z][A-Za-z0-9]*$")  # ncnn layer types: Convolution, InnerProduct...


class PoolShortcut(nn.Module):
    """ResNet's option-A shortcut with the stride as a 1x1 max pool (ncnn has no strided slice):
    the same values as `Shortcut`."""

    def __init__(self, shortcut: Shortcut) -> None:
        super().__init__()
        self.stride, self.extra = shortcut.stride, shortcut.extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, 1, self.stride)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


def ncnn_friendly(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval, CPU) with the modules ncnn cannot run swapped for equal ones."""
    model = copy.deepcopy(model).cpu().eval()
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, Shortcut):
                setattr(parent, child_name, PoolShortcut(child))
            elif isinstance(child, ChannelShuffle):
                child.export_as_gather = False
    return model


def export_ncnn(
    model: nn.Module,
    param_path: str | Path,
    image_shape: tuple[int, ...],
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> Path:
    """Write `model` as ncnn `param_path` (.param) and the .bin next to it, fp32 weights."""
    pnnx = require("pnnx")
    param_path = Path(param_path)
    param_path.parent.mkdir(parents=True, exist_ok=True)
    bin_path = param_path.with_suffix(".bin")
    label = name or type(model).__name__
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_onnx(
            ncnn_friendly(model), Path(tmp) / "model.onnx", image_shape, opset, dynamo, label
        )
        shape = "[" + ",".join(str(d) for d in (1, *image_shape)) + "]f32"
        cmd = [pnnx.EXEC_PATH, str(onnx), f"inputshape={shape}", "fp16=0", "device=cpu"]
        cmd += [f"ncnnparam={param_path}", f"ncnnbin={bin_path}"]
        side = {k: str(Path(tmp) / f"model.{k}") for k in ("pnnxparam", "pnnxbin", "pnnxonnx")}
        side |= {"pnnxpy": str(Path(tmp) / "model_pnnx.py"), "ncnnpy": str(Path(tmp) / "m.py")}
        cmd += [f"{k}={v}" for k, v in side.items()]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    log = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0 or not param_path.is_file() or not bin_path.is_file():
        tail = next((t for t in reversed(log) if t.strip()), "no output")
        raise ExportError(f"pnnx cannot convert {label}: exit {done.returncode}: {tail[:300]}")
    missing = unconverted_layers(param_path)
    if missing:
        said = [t.strip() for t in log if "not supported" in t]
        why = f" ({said[0]})" if said else ""
        raise ExportError(
            f"pnnx cannot express {label} in ncnn: no ncnn layer for {', '.join(missing)}{why}"
        )
    return param_path


def unconverted_layers(param_path: str | Path) -> list[str]:
    """The layer types of an ncnn .param that are not ncnn layers (pnnx leaves an op it cannot
    convert under its torch name: Tensor.slice, aten::..., pnnx.Expression)."""
    lines = Path(param_path).read_text().splitlines()[2:]  # magic, then layer and blob counts
    kinds = [line.split()[0] for line in lines if line.strip()]
    return sorted({k for k in kinds if not _NCNN_TYPE.match(k)})


def load_net(param_path: str | Path, threads: int | None = None) -> Any:
    """An ncnn Net from `param_path` and its .bin, fp32 storage and arithmetic."""
    ncnn = require("ncnn")
    net = ncnn.Net()
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic", "use_bf16_storage"):
        setattr(net.opt, flag, False)
    net.opt.use_vulkan_compute = False
    # no busy-waiting OpenMP threads after a layer: on a shared or oversubscribed CPU they spin
    # against PyTorch's threads and a neighbour's (30x slower batches seen on 2 shared cores)
    net.opt.openmp_blocktime = 0
    if threads:
        net.opt.num_threads = int(threads)
    param_path = Path(param_path)
    if net.load_param(str(param_path)) != 0:
        raise ExportError(f"ncnn cannot load {param_path}: {unconverted_layers(param_path)}")
    if net.load_model(str(param_path.with_suffix(".bin"))) != 0:
        raise ExportError(f"ncnn cannot load the weights {param_path.with_suffix('.bin')}")
    return net


def ncnn_run(net: Any, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Logits of an NCHW batch: one extractor per CHW image (ncnn has no batch axis)."""
    ncnn = require("ncnn")
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
    arr = np.ascontiguousarray(arr, np.float32)
    inp, out = net.input_names()[0], net.output_names()[0]
    rows = []
    for image in arr:
        with net.create_extractor() as ex:
            ex.input(inp, ncnn.Mat(image))
            code, mat = ex.extract(out)
            if code != 0:
                raise ExportError(f"ncnn failed to run the model: extract returned {code}")
            rows.append(np.array(mat).reshape(-1))
    return np.stack(rows)


def ncnn_logits(net: Any, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of an ncnn Net over every batch of `loader`."""
    outs, labels = [], []
    for x, y in loader:
        outs.append(torch.from_numpy(ncnn_run(net, x)).float())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def ncnn_latency_ms(
    net: Any, image_shape: tuple[int, ...], batch_size: int = 1, reps: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one batch (a loop of `batch_size` images) in milliseconds."""
    x = np.random.default_rng(0).standard_normal((batch_size, *image_shape), dtype=np.float32)
    for _ in range(warmup):
        ncnn_run(net, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        ncnn_run(net, x)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]


def ncnn_bytes(param_path: str | Path) -> int:
    """Size of the ncnn model: the .param and its .bin."""
    param_path = Path(param_path)
    return param_path.stat().st_size + param_path.with_suffix(".bin").stat().st_size
