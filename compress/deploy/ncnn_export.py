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

`export_ncnn_int8` writes a QAT model's QDQ form (`to_qdq`) as ncnn int8: the float twin of the
QDQ model (`ncnn_float_twin`: convs with weight codes * scale, activations as mul / round /
clip) goes through pnnx, then `int8_ncnn` rewrites the integer convs / linears of the .param /
.bin as ncnn int8 layers (int8 codes, weight scales 1 / scale, input scale 1 / in_scale).
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
from compress.deploy.qdq import QDQAct, QDQConv2d, QDQLinear, Regrid
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
    convert under its torch or ONNX name: Tensor.slice, aten::..., pnnx.Expression, ReduceMax;
    ncnn's own registry tells the last kind, which looks like a layer type, from a real one)."""
    ncnn = require("ncnn")
    lines = Path(param_path).read_text().splitlines()[2:]  # magic, then layer and blob counts
    kinds = {line.split()[0] for line in lines if line.strip()}
    return sorted(k for k in kinds if not _NCNN_TYPE.match(k) or ncnn.layer_to_index(k) < 0)


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


# ---------------------------------------------------------------- int8 (QAT checkpoints)
# ncnn's int8 Convolution / ConvolutionDepthWise / InnerProduct (param 8=int8_scale_term): the
# .bin holds the weight blob with the int8 tag (0x000D4B38, the int8 codes padded to 4 bytes),
# the bias (num_output raw floats), weight_data_int8_scales (raw floats: num_output, or `group`
# for ConvolutionDepthWise) and bottom_blob_int8_scales (1 raw float). ncnn quantizes the
# layer's input as round(x * bottom_scale) clamped to [-127, 127], dequantizes the int32 sum by
# 1 / (bottom_scale * weight_scale[o]), adds the bias and applies the fused activation.
_TAG_INT8 = 0x000D4B38
_TAG_FP16 = 0x01306B47
_TAG_FP32 = 0x0002C056
_WEIGHT_LAYERS = ("Convolution", "ConvolutionDepthWise", "InnerProduct")
# layers pnnx writes for these models that carry nothing in the .bin
_NO_WEIGHTS = {
    "Input", "Split", "Pooling", "ReLU", "Clip", "UnaryOp", "BinaryOp", "Flatten", "Reshape",
    "Concat", "Slice", "Crop", "Padding", "Permute", "ShuffleChannel", "Softmax", "Sigmoid",
    "HardSigmoid", "HardSwish", "Swish", "TanH", "Eltwise", "Dropout", "Noop", "Squeeze",
    "ExpandDims", "Interp", "Pooling1D", "Mish", "ELU", "GELU", "Reduction", "Threshold",
}  # fmt: skip


class FloatGrid(nn.Module):
    """A QDQAct in float ops pnnx converts (mul, round, clip): ((clamp(round(x / scale) + zp,
    lo, hi) - out_zp) * out_scale, the same grid as the Q / clamp / DQ."""

    def __init__(self, q: Any) -> None:
        super().__init__()
        self.inv = 1.0 / q.scale
        self.zp, self.lo, self.hi = float(q.zero_point), float(q.lo), float(q.hi)
        self.out_zp, self.out_scale = float(q.out_zp), q.out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x * self.inv) + self.zp, self.lo, self.hi)
        return (q - self.out_zp) * self.out_scale if self.out_zp else q * self.out_scale


def ncnn_float_twin(qdq: nn.Module) -> tuple[nn.Module, dict[nn.Module, tuple[Any, str | None]]]:
    """The QDQ model (`compress.deploy.qdq.to_qdq`) as plain float modules: a QDQConv2d /
    QDQLinear becomes an nn.Conv2d / nn.Linear with weight codes * scale and the float bias, a
    QDQAct a `FloatGrid`, a Regrid its layer (its values are on the grid already).

    Returns the model and, per new conv / linear, (its QDQ layer, why it stays fp32 or None)."""
    model = copy.deepcopy(qdq).cpu().eval()
    regrids = {id(m.grid) for m in model.modules() if isinstance(m, Regrid)}
    grids: dict[float, list[tuple[int, int]]] = {}  # out_scale -> code ranges read at it
    for m in model.modules():
        if isinstance(m, QDQAct) and id(m) not in regrids:
            grids.setdefault(m.out_scale, []).append((m.lo - m.out_zp, m.hi - m.out_zp))
    layers: dict[nn.Module, tuple[Any, str | None]] = {}

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            new: nn.Module | None = None
            if isinstance(child, Regrid):
                new = FloatGrid(child.layer) if isinstance(child.layer, QDQAct) else child.layer
                convert(new)
            elif isinstance(child, QDQAct):
                new = FloatGrid(child)
            elif isinstance(child, QDQConv2d | QDQLinear):
                new = _float_layer(child)
                ranges = grids.get(child.in_scale)
                why = None
                if not ranges:
                    why = "its input grid is not a quantizer's"
                elif any(lo < -127 or hi > 127 for lo, hi in ranges):
                    why = "its input codes do not fit int8 [-127, 127] (8-bit activations)"
                layers[new] = (child, why)
            else:
                convert(child)
            if new is not None:
                setattr(parent, name, new)

    convert(model)
    return model, layers


def _float_layer(layer: Any) -> nn.Module:
    w = (layer.codes.float() * layer.scale.view(-1, *([1] * (layer.codes.dim() - 1)))).float()
    bias = None if layer.float_bias is None else layer.float_bias.float()
    if layer.codes.dim() == 4:
        out_c, in_c, kh, kw = w.shape
        new: nn.Module = nn.Conv2d(
            in_c * layer.groups, out_c, (kh, kw), layer.stride, layer.padding, layer.dilation,
            layer.groups, bias=bias is not None,
        )  # fmt: skip
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new.eval()


def _parse_param(text: str) -> list[list[str]]:
    """Each layer line of an ncnn .param as tokens (magic and counts dropped)."""
    return [line.split() for line in text.splitlines()[2:] if line.strip()]


def _params(tokens: list[str]) -> dict[int, str]:
    nb, nt = int(tokens[2]), int(tokens[3])
    out: dict[int, str] = {}
    for kv in tokens[4 + nb + nt :]:
        k, _, v = kv.partition("=")
        key = int(k)
        out[-key - 23300 if key <= -23300 else key] = v
    return out


def _tagged_size(data: bytes, pos: int, n: int) -> int:
    """Bytes of a tagged ncnn blob of `n` values at `pos` (ModelBin::load(w, type=0))."""
    tag = int.from_bytes(data[pos : pos + 4], "little")
    if tag == _TAG_FP16:
        return 4 + (2 * n + 3) // 4 * 4
    if tag == _TAG_INT8:
        return 4 + (n + 3) // 4 * 4
    if tag in (0, _TAG_FP32):
        return 4 + 4 * n
    return 4 + 256 * 4 + (n + 3) // 4 * 4  # 256-entry lookup table + uint8 indices


def _bin_chunks(layers: list[list[str]], data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every layer's bytes in the .bin, in .param order."""
    pos, spans = 0, []
    for tokens in layers:
        kind, p, start = tokens[0], _params(tokens), pos
        if kind in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            nout = int(p.get(0, "0"))
            bias = int(p.get(5 if kind != "InnerProduct" else 1, "0"))
            size = int(p.get(6 if kind != "InnerProduct" else 2, "0"))
            int8 = int(p.get(8, "0"))
            pos += _tagged_size(data, pos, size) + 4 * nout * bias
            if int8:
                nscale = int(p.get(7, "1")) if kind == "ConvolutionDepthWise" else nout
                pos += 4 * (nscale + 1 + (int8 > 100))
        elif kind == "MemoryData":
            dims = [int(p.get(k, "0")) for k in (0, 1, 11, 2)]
            pos += 4 * int(np.prod([d for d in dims if d] or [1]))
        elif kind == "BatchNorm":
            pos += 16 * int(p.get(0, "0"))
        elif kind not in _NO_WEIGHTS:
            raise ExportError(f"ncnn int8: cannot walk the weights of a {kind} layer")
        spans.append((start, pos))
    if pos != len(data):
        raise ExportError(f"ncnn int8: the .bin has {len(data)} bytes, the .param {pos}")
    return spans


def int8_ncnn(
    param_path: str | Path, layers: list[tuple[nn.Module, Any, str | None]]
) -> dict[str, Any]:
    """Rewrite the fp32 ncnn model at `param_path` in place: the i-th weight layer (Convolution,
    ConvolutionDepthWise, InnerProduct, in .param order) is `layers[i]` = (float module, QDQ layer
    or None, why it stays fp32); those with a QDQ layer and no reason get int8 weight codes,
    weight scales 1 / scale and input scale 1 / in_scale (8=2; 8=1 for ConvolutionDepthWise,
    whose one scale per group it then reads). Returns what was done."""
    param_path = Path(param_path)
    bin_path = param_path.with_suffix(".bin")
    text, data = param_path.read_text(), bin_path.read_bytes()
    lines = text.splitlines()
    ncnn_layers = _parse_param(text)
    spans = _bin_chunks(ncnn_layers, data)
    found = [i for i, t in enumerate(ncnn_layers) if t[0] in _WEIGHT_LAYERS]
    if len(found) != len(layers):
        raise ExportError(
            f"ncnn int8: {len(found)} conv / linear layers in ncnn, {len(layers)} in PyTorch"
        )
    out, report = bytearray(), {"int8_layers": [], "fp32_layers": {}}
    edits: dict[int, tuple[str, bytes]] = {}
    for i, (mod, qdq, why) in zip(found, layers, strict=True):
        tokens, p = ncnn_layers[i], _params(ncnn_layers[i])
        kind, name = tokens[0], tokens[1]
        ip = kind == "InnerProduct"
        nout, bias = int(p[0]), int(p.get(1 if ip else 5, "0"))
        size = int(p.get(2 if ip else 6, "0"))
        start, end = spans[i]
        if nout != mod.weight.shape[0] or size != mod.weight.numel():
            raise ExportError(
                f"ncnn int8: layer {name} ({kind} {nout} outputs, {size} weights) is not the "
                f"PyTorch {type(mod).__name__} {tuple(mod.weight.shape)}"
            )
        tag = int.from_bytes(data[start : start + 4], "little")
        if tag not in (0, _TAG_FP32):
            raise ExportError(f"ncnn int8: layer {name} weights are not fp32 (tag {tag:#x})")
        w = np.frombuffer(data, np.float32, size, start + 4)
        if not np.allclose(w, mod.weight.detach().numpy().reshape(-1), rtol=1e-5, atol=1e-7):
            raise ExportError(f"ncnn int8: layer {name}'s weights are not the PyTorch layer's")
        if qdq is None or why or int(p.get(8, "0")):
            report["fp32_layers"][name] = why or "float weights"
            continue
        wscale = (1.0 / qdq.scale.double()).float().numpy()
        if kind == "ConvolutionDepthWise":  # one weight scale per group
            group = int(p.get(7, "1"))
            per = wscale.reshape(group, -1)
            if not (per == per[:, :1]).all():
                report["fp32_layers"][name] = "group conv with per-channel scales"
                continue
            wscale = per[:, 0].copy()
        codes = qdq.codes.to(torch.int8).numpy().reshape(-1)
        blob = _TAG_INT8.to_bytes(4, "little") + codes.tobytes()
        blob += bytes(-len(codes) % 4)
        blob += data[start + 4 + 4 * size : start + 4 + 4 * size + 4 * nout * bias]
        blob += wscale.astype("<f4").tobytes()
        blob += np.array([1.0 / qdq.in_scale], "<f4").tobytes()
        # ConvolutionDepthWise reads `group` weight scales under 8=1 (one under 8=2);
        # Convolution and InnerProduct read num_output under any nonzero 8
        term = 1 if kind == "ConvolutionDepthWise" else 2
        edits[i] = (lines[i + 2] + f" 8={term}", blob)
        report["int8_layers"].append(name)
    pos = 0
    for i, (start, end) in enumerate(spans):
        if i in edits:
            out += data[pos:start] + edits[i][1]
            lines[i + 2] = edits[i][0]
            pos = end
    out += data[pos:]
    bin_path.write_bytes(bytes(out))
    param_path.write_text("\n".join(lines) + "\n")
    return report


def export_ncnn_int8(
    qdq: nn.Module,
    param_path: str | Path,
    image_shape: tuple[int, ...],
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    dynamo: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Write the QDQ model `qdq` (`to_qdq` of a QAT model) as an ncnn int8 model: its float twin
    (`ncnn_float_twin`) through pnnx, then its integer convs / linears as int8 layers
    (`int8_ncnn`). Returns the .param path and {"int8_layers": [...], "fp32_layers": {name:
    why}} (ncnn layer names)."""
    twin, info = ncnn_float_twin(qdq)
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: order.append(mod))
        for m in twin.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        twin(torch.zeros(1, *image_shape))
    for h in hooks:
        h.remove()
    if len(set(map(id, order))) != len(order):
        raise ExportError("ncnn int8: a conv / linear is called more than once")
    path = export_ncnn(twin, param_path, image_shape, name, opset, dynamo)
    layers = [(m, *info.get(m, (None, "float weights"))) for m in order]
    return path, int8_ncnn(path, layers)
