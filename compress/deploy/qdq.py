"""A fake-quantized (QAT) model as a real integer model: every quantizer becomes explicit
QuantizeLinear / DequantizeLinear pairs that ONNX Runtime fuses into QLinearConv / QLinearAdd
integer kernels and OpenVINO runs in int8 (the QDQ format, the same one `calibrate.py` writes by
post-training quantization).

`to_qdq(model, calib)` returns a copy of `model` in which
- every activation quantizer is a `QDQAct`: Q to integer codes, a clamp of the codes where the
  quantizer has fewer levels than its 8-bit type, DQ back (k-bit DoReFa / PACT: uint8 codes
  0..2^k - 1 at scale 1 / n or alpha / n; int8 QAT: its uint8 scale and zero point; LSQ: its
  codes at its learned step, uint8 0..Q_P or, signed, -Q_N..Q_P as uint8 around zero point 128
  (int8 inputs are not fused into integer convs by ONNX Runtime); ternary: uint8 {0, 1, 2}
  (thresholds at +-t); binary: uint8 {0, 2} read as -1 / +1). A quantizer
  module called at several sites (torchvision's shared ReLU) becomes one QDQAct; layer-input
  quantizers (quant.act.sites=inputs: BN outputs, Hardswish / SiLU outputs, squeeze-excitation
  products, residual sums) become calls of their own on their tensor, one QDQAct for all its
  readers (`explicit_input_quantizers`; the result is an FX GraphModule with the same layer
  names);
- BNs are folded into the layer before them (compress.fuse with exact=False: Q(w) * s baked into
  the weights, which integer codes times a per-channel scale express; equal to float rounding,
  not bit for bit where a rounding quantizer follows);
- every conv / linear whose weight is quantized and whose input is such an integer tensor is a
  `QDQConv2d` / `QDQLinear` (one called at several places, an FPN detector's head shared by the
  levels, when every call reads one quantizer's codes): an int8 weight initializer with one
  scale per output channel (BN's scale folded in) and an int32 bias at scale input_scale *
  weight_scale, which is what the integer kernels need. Low-bit codes are widened (exactly) to
  make that bias step finer, as far as AVX2's saturating int16 pair sums allow for the input's
  codes (`code_span`; codes that are wide already, int8 or 7-bit weights, are not narrowed:
  behind 8-bit activations an AVX2 CPU without VNNI can saturate them, as with any u8s8 int8
  model). Before a sign the bias is floored, which makes the sign exact;
- a max pool or a channel shuffle between a quantizer and its conv moves integer codes (a Q / DQ
  pair with the same parameters after it), so the conv after it still reads DQ; conv -> max pool
  -> quantizer becomes conv -> quantizer -> max pool (equal: the quantizer is monotone);
- with `calib` batches, what the QAT model left float around an integer layer gets 8 bits on the
  observed min / max range: the output of a conv that meets a residual add before any quantizer
  (clipped to what the quantizer after the add can see) or an activation the QAT model keeps
  float (Hardswish, SiLU, a functional ReLU: clipped where that activation is constant), and
  the input of a conv behind a float op. These are the only steps that are not in the QAT
  model; where many of them follow each other (MobileNet-v3's conv -> Hardswish in every
  block), their rounding adds up (measured: `docs/deploy.md`).

Weights map to int8 exactly when their levels are integers times a per-channel scale: DoReFa
with k <= 7 bits (levels (2i - n) / n, n = 2^k - 1, codes -n..n, scale 1 / n), ternary and
binary (codes -1, 0, +1, scale alpha_c), int8 QAT and LSQ (its codes, its per-channel step as
the scale; 8-bit LSQ weights use [-127, 127], so a negated channel fits). DoReFa 8-bit weights
need 9 bits and are
refused (`QDQError`). The integer model computes what the fake-quant model computes up to fp32
rounding and the int32 rounding of the biases (half a bias step, which with k-bit activations
and large BN scales can move an activation by one level: measured top-1 agreement 97.6% on a
real 4-bit ResNet-9, 99-100% on the synthetic-trained models of the tests); `check_exact`
measures it.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compress.errors import CompressError
from compress.fuse import LeafTracer, fuse_bn_
from compress.models.blocks import Activation, ChannelShuffle
from compress.models.resnet import Shortcut
from compress.quant.base import Quantizer
from compress.quant.int8 import Int8Act, act_qparams, int8_weight_codes
from compress.quant.lsq import TINY
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import (
    BinaryAct,
    DoReFaAct,
    LSQAct,
    LSQWeight,
    PACTAct,
    TernaryAct,
)

log = logging.getLogger(__name__)
QD = torch.ops.quantized_decomposed
INT32 = (-(2**31), 2**31 - 1)
_DTYPE_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
_SIGN_SCALE = 2.0**-100  # Q scale of a sign: any nonzero value saturates (see `sign_qdq`)


class QDQError(CompressError):
    """The model's quantizers cannot be written as 8-bit integer codes exactly."""


# ---------------------------------------------------------------- modules
class QDQAct(nn.Module):
    """x -> Q(x; scale, zero_point, dtype) -> clamp codes to [lo, hi] -> DQ(out_scale, out_zp).

    The clamp is only emitted when [lo, hi] is narrower than the dtype's range (k < 8 bits)."""

    def __init__(
        self,
        scale: float,
        zero_point: int,
        lo: int,
        hi: int,
        out_scale: float | None = None,
        out_zp: int | None = None,
        dtype: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__()
        self.scale, self.zero_point, self.dtype = float(scale), int(zero_point), dtype
        self.lo, self.hi = int(lo), int(hi)
        self.out_scale = float(scale if out_scale is None else out_scale)
        self.out_zp = int(zero_point if out_zp is None else out_zp)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = _DTYPE_RANGE[self.dtype]
        q = QD.quantize_per_tensor(x, self.scale, self.zero_point, qmin, qmax, self.dtype)
        if (self.lo, self.hi) != (qmin, qmax):
            q = q.clamp(self.lo, self.hi)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = _DTYPE_RANGE[self.dtype]
        return QD.dequantize_per_tensor(
            self.codes(x), self.out_scale, self.out_zp, qmin, qmax, self.dtype
        )

    @property
    def levels(self) -> int:
        return self.hi - self.lo + 1

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:.4g}, zero_point={self.zero_point}, codes=[{self.lo}, {self.hi}], "
            f"out_scale={self.out_scale:.4g}, out_zp={self.out_zp}"
        )


class Regrid(nn.Module):
    """A layer that keeps values on their integer grid (max pool, channel shuffle) followed by a
    Q / DQ pair with the same parameters: the runtime moves the codes through it and the conv
    after it reads a DQ (exact: the values are on the grid already)."""

    def __init__(self, layer: nn.Module, grid: QDQAct) -> None:
        super().__init__()
        self.layer = layer
        qmin, qmax = _DTYPE_RANGE[grid.dtype]
        self.grid = QDQAct(grid.out_scale, grid.out_zp, qmin, qmax, dtype=grid.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(self.layer(x))


class _QDQLayer(nn.Module):
    codes: torch.Tensor
    scale: torch.Tensor
    bias_codes: torch.Tensor | None

    def _init_codes(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        in_scale: float,
        name: str,
    ) -> None:
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", torch.zeros(len(scale), dtype=torch.int64))
        self.in_scale = float(in_scale)
        self.name = name
        self.float_bias = None if bias is None else bias.detach().double().clone()
        self.register_buffer("bias_codes", None)
        self.set_bias_rounding(torch.round)

    def set_bias_rounding(self, rounding: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """int32 bias codes at scale in_scale * weight_scale. Before a sign, `torch.floor`
        makes the sign exact: the output is step * (integer + b / step), and
        integer + b / step >= 0 exactly when integer + floor(b / step) >= 0."""
        if self.float_bias is None:
            return
        b = rounding(self.float_bias / (self.in_scale * self.scale.double()))
        over = b.abs() > INT32[1]
        if over.any() and rounding is not torch.floor:  # before a sign, saturation is exact
            c = int(over.nonzero()[0])
            raise QDQError(
                f"{self.name}: output channel {c}'s bias is {float(b[c]):.3g} int32 steps (its "
                "folded weight scale is near zero, e.g. a BN gamma of ~0): prune the channel "
                "or export with int8=false"
            )
        self.bias_codes = b.clamp(*INT32).to(torch.int32)

    def weight(self) -> torch.Tensor:
        return QD.dequantize_per_channel(
            self.codes, self.scale, self.zero, 0, -127, 127, torch.int8
        )

    def bias(self) -> torch.Tensor | None:
        if self.bias_codes is None:
            return None
        return QD.dequantize_per_channel(
            self.bias_codes, self.scale * self.in_scale, self.zero, 0, *INT32, torch.int32
        )


class QDQConv2d(_QDQLayer):
    """A conv on int8 weight codes with per-output-channel scales and an int32 bias."""

    def __init__(
        self,
        conv: nn.Conv2d,
        codes: torch.Tensor,
        scale: torch.Tensor,
        in_scale: float,
        name: str = "conv",
    ) -> None:
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise QDQError(f"padding_mode={conv.padding_mode!r}: only zero padding is exact")
        self._init_codes(codes, scale, conv.bias, in_scale, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            x, self.weight(), self.bias(), self.stride, self.padding, self.dilation, self.groups
        )


class QDQLinear(_QDQLayer):
    def __init__(
        self,
        linear: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        in_scale: float,
        name: str = "linear",
    ) -> None:
        super().__init__()
        self._init_codes(codes, scale, linear.bias, in_scale, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias())


# ---------------------------------------------------------------- weights
def weight_codes(layer: QConv2d | QLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes, per-channel scale) with codes * scale == the layer's quantized weight, or
    None for a float weight. Raises QDQError for levels that int8 cannot hold."""
    wq = layer.weight_quant
    kind = wq.kind
    if kind == "fp32":
        return None
    with torch.no_grad():
        if kind == "int8":
            return int8_weight_codes(layer.weight)
        if isinstance(wq, LSQWeight):  # the codes and the step, exactly as the forward has them
            return wq.codes(layer.weight).to(torch.int8), wq.step.detach().float().clamp_min(TINY)
        q = layer.quantized_weight().detach().float()
        flat = q.reshape(q.shape[0], -1)
        if kind == "dorefa":
            n = 2**wq.bits - 1
            if n > 127:
                raise QDQError(
                    f"DoReFa {wq.bits}-bit weights have levels (2i - {n}) / {n}, which need "
                    f"{wq.bits + 1} bits: int8 cannot hold them (use 7 bits or fewer, or "
                    "quant=int8_qat)"
                )
            codes = torch.round(q * n)
            scale = torch.full((q.shape[0],), 1.0 / n)
        elif kind in ("ternary", "binary"):
            amax = flat.abs().amax(1)
            scale = torch.where(amax > 0, amax, torch.ones_like(amax))
            codes = torch.round(q / scale.view(-1, *([1] * (q.dim() - 1))))
        else:
            raise QDQError(f"weight quantizer kind={kind!r} has no int8 form")
    return codes.to(torch.int8), scale


def widen(codes: torch.Tensor, scale: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same weight with its codes multiplied by the largest integer that keeps them within
    +-span (exact): the int32 bias, at step in_scale * scale, gets that much finer."""
    m = max(1, span // max(1, int(codes.abs().max())))
    return (codes.to(torch.int16) * m).to(torch.int8), scale / m


def code_span(act_hi: int) -> int:
    """How wide weight codes may be behind uint8 activation codes up to `act_hi`: AVX2 has no
    VNNI, and its VPMADDUBSW adds two uint8 x int8 products in a saturating int16, so
    2 * act_hi * span must stay below 2^15 (k-bit activations with k <= 7 allow all of int8)."""
    return max(1, min(127, (2**15 - 1) // (2 * max(1, act_hi))))


def _rescale(codes: torch.Tensor, w: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel scale that maps `codes` onto the (BN-folded) float weight `w`: least
    squares per channel, a negative scale turned into negated codes. Raises when `w` is not
    codes * scale (a fold that broke the grid)."""
    c = codes.reshape(len(codes), -1).double()
    v = w.detach().reshape(len(w), -1).double()
    norm = (c * c).sum(1)
    scale = torch.where(norm > 0, (c * v).sum(1) / norm.clamp_min(1), torch.ones_like(norm))
    dead = v.abs().amax(1) == 0  # a BN gamma of exactly 0: codes 0 at any scale
    c = torch.where(dead.view(-1, 1), torch.zeros_like(c), c)
    scale = torch.where(dead, torch.ones_like(scale), scale)
    flip = scale < 0
    c = torch.where(flip.view(-1, 1), -c, c)
    scale = scale.abs().clamp_min(1e-30)
    err = (c * scale.view(-1, 1) - v).abs().amax(1)
    tol = 1e-5 * v.abs().amax(1)
    if (err > tol).any():
        raise QDQError(f"{name}: the folded weight is not int8 codes times a channel scale")
    return c.to(torch.int8).view_as(codes), scale.float()


# ---------------------------------------------------------------- activations
def act_qdq(q: nn.Module, producer_scale: float | None = None) -> QDQAct | None:
    """The QDQAct computing activation quantizer `q` (None for a float activation)."""
    if isinstance(q, Int8Act):  # a ReLU6 site's range is within [0, 6]: 255 is its top code too
        scale, zp = q.qparams()
        clamps_at_zero = q.relu or getattr(q, "float_type", None) is nn.ReLU6
        return QDQAct(float(scale), int(zp), int(zp) if clamps_at_zero else 0, 255)
    if isinstance(q, DoReFaAct | PACTAct):
        n = 2**q.bits - 1
        if n > 255:
            raise QDQError(f"{q.bits}-bit activations do not fit 8 bits")
        alpha = 1.0 if isinstance(q, DoReFaAct) else max(float(q.alpha.detach()), 1e-4)
        return QDQAct(alpha / n, 0, 0, n)
    if isinstance(q, LSQAct):
        # signed codes -Q_N..Q_P as uint8 around zero point 128: the same values, and ONNX
        # Runtime fuses uint8 inputs into QLinearConv (int8 ones it leaves to float convs)
        step, zp = max(float(q.step.detach()), TINY), 128 if q.signed else 0
        return QDQAct(step, zp, zp - q.qn, zp + q.qp)
    if isinstance(q, TernaryAct):
        # round(x / 2t) is nonzero exactly where |x| > t (ties at |x| = t round to even: 0)
        return QDQAct(2 * q.threshold, 1, 0, 2, out_scale=1.0, out_zp=1)
    if isinstance(q, BinaryAct):
        return sign_qdq(producer_scale)
    if isinstance(q, Quantizer) and q.kind == "fp32" or isinstance(q, nn.ReLU):
        return None
    raise QDQError(f"activation quantizer {type(q).__name__} has no 8-bit integer form")


def sign_qdq(producer_scale: float | None = None) -> QDQAct:
    """sign(x) (sign(0) = +1) as uint8 codes {0, 2} read back with zero point 1: Q with a scale
    so small that any nonzero value saturates, zero point 2 (x = 0 -> 2), codes clamped to
    [0, 2]. A conv output is a multiple of its input scale times its weight scales, so a scale
    below a quarter of that step is exact there (and keeps ORT's requantization multiplier
    finite); a float input uses 2^-100."""
    scale = _SIGN_SCALE if producer_scale is None else producer_scale / 4
    return QDQAct(scale, 2, 0, 2, out_scale=1.0, out_zp=1)


# ---------------------------------------------------------------- conversion
# layers whose output is on the grid of their input: max pools, permutations, and a ResNet's
# option-A shortcut (subsampling and zero channels: 0.0 is a code of every grid here)
_KEEPS_GRID = (
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    ChannelShuffle,
    Shortcut,
    nn.Identity,
    nn.Dropout,
)


@dataclass
class QDQReport:
    """What `to_qdq` made integer, and what it left float and why."""

    acts: list[str] = field(default_factory=list)
    integer_layers: list[str] = field(default_factory=list)  # integer in, integer out
    requantized: list[str] = field(default_factory=list)  # out: an added, calibrated 8 bits
    requantized_inputs: list[str] = field(default_factory=list)  # in: the same
    float_layers: dict[str, str] = field(default_factory=dict)
    bn_kept: dict[str, str] = field(default_factory=dict)
    calib_images: int = 0

    def as_metrics(self) -> dict[str, object]:
        return {
            "qdq_acts": len(self.acts),
            "qdq_integer_layers": len(self.integer_layers),
            "qdq_requantized_layers": len(self.requantized),
            "qdq_requantized_inputs": len(self.requantized_inputs),
            "qdq_calib_images": self.calib_images,
            "qdq_float_layers": dict(self.float_layers),
        }


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _set_quantizer(model: nn.Module, name: str, site: nn.Module, new: nn.Module) -> None:
    """Put `new` where the quantizer of module `name` (an Activation slot or the quantizer
    itself) was."""
    if isinstance(site, Activation):
        site.fn = new
    else:
        _set(model, name, new)


def _quantizer_of(m: nn.Module) -> nn.Module | None:
    fn = m.fn if isinstance(m, Activation) else m
    return fn if isinstance(fn, Quantizer) else None


def _skip_identity(node: object, mods: dict[str, nn.Module]) -> object:
    while (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and isinstance(mods[node.target], nn.Identity)
        and len(node.users) == 1
    ):
        node = node.args[0]
    return node


@torch.no_grad()
def to_qdq(
    model: nn.Module, calib: Iterable[torch.Tensor] | None = None
) -> tuple[nn.Module, QDQReport]:
    """A QDQ copy of the fake-quantized `model` (eval mode, on the CPU) and what was done.

    `calib`: batches of normalized inputs for the 8-bit ranges of what the QAT model leaves float
    next to an integer layer (see the module docstring); without, those layers keep int8
    weights and a float input or output."""
    m = copy.deepcopy(model).cpu().eval()
    codes = {
        name: c
        for name, layer in m.named_modules()
        if isinstance(layer, QConv2d | QLinear) and (c := weight_codes(layer)) is not None
    }
    report = QDQReport()
    try:  # codes first: folding keeps the quantized grid
        m = explicit_input_quantizers(m)
        report.bn_kept = dict(fuse_bn_(m).skipped)
        work = _Conversion(m, codes, report, None if calib is None else list(calib))
    except (fx.proxy.TraceError, TypeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QDQError(
            f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {first[:200]})"
        ) from None
    for node in work.graph.nodes:
        if node.op == "call_module":
            work.visit(node)
    work.requantize_inputs()
    work.requantize_outputs()
    for name in codes:
        if name not in report.integer_layers and name not in report.float_layers:
            calls = work.calls.get(name, 0)
            report.float_layers[name] = "shared by several calls" if calls else "never called"
    return m, report


def explicit_input_quantizers(model: nn.Module) -> nn.Module:
    """`model` with each layer-input quantizer (quant.act.sites=inputs, `layer.input_quant`) as
    a call of its own on the tensor, read by every layer that shares it: the form the
    conversion walks (a quantizer site, then integer layers). An FX GraphModule whose layers
    keep their names; the quantizer of layer `a.b` is `a.b_input`. `model` (a copy: its layers
    lose their `input_quant`) comes back as it is when it has none."""
    readers = {
        name: layer
        for name, layer in model.named_modules()
        if layer._modules.get("input_quant") is not None
    }
    if not readers:
        return model
    graph = LeafTracer().trace(model)
    placed: dict[tuple[int, object], fx.Node] = {}
    quantizers: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in readers:
            continue
        q, x = readers[node.target].input_quant, node.args[0]
        if (id(q), x) not in placed:
            target = f"{node.target}_input"
            quantizers[target] = q
            with graph.inserting_before(node):
                placed[id(q), x] = graph.call_module(target, (x,))
        node.args = (placed[id(q), x], *node.args[1:])
    for layer in readers.values():
        layer.input_quant = None
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            target = node.target
            root[target] = quantizers[target] if target in quantizers else _attr(model, target)
    out = fx.GraphModule(root, graph, class_name=type(model).__name__)
    if hasattr(model, "arch"):
        out.arch = model.arch
    return out.eval()


def _attr(model: nn.Module, target: str) -> object:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Conversion:
    """One walk over the FX graph of the BN-folded copy `m`, in execution order, replacing
    modules in place. State: which nodes output integer codes (`grid`), which are integer
    layers (`layers`) and which of those a quantizer reads (`read`)."""

    def __init__(
        self,
        m: nn.Module,
        codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
        report: QDQReport,
        calib: list[torch.Tensor] | None,
    ) -> None:
        self.m, self.codes, self.report, self.calib = m, codes, report, calib
        self.graph = LeafTracer().trace(m)
        self.mods = dict(m.named_modules())
        self.calls: dict[str, int] = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.grid: dict[fx.Node, QDQAct] = {}  # nodes whose output is DQ(integer codes)
        self.layers: dict[fx.Node, _QDQLayer] = {}  # nodes computed by an integer layer
        self.read: set[fx.Node] = set()  # integer layers whose output a quantizer reads
        self.sites: dict[fx.Node, nn.Module] = {}  # quantizer call sites -> fake quantizer
        self.shared: dict[str, QDQAct | None] = {}  # quantizers called at several sites
        # layers called at several places: (integer form, the grid it reads, float form)
        self.shared_layers: dict[str, tuple[_QDQLayer, QDQAct, nn.Module] | None] = {}
        self.pending: dict[fx.Node, nn.Module] = {}  # quantized layers with a float input

    def visit(self, node: fx.Node) -> None:
        name, mod = node.target, self.mods[node.target]
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        q = _quantizer_of(mod)
        if self.calls[name] > 1:
            if q is not None:
                self.shared_site(node, name, mod, q, src)
            elif isinstance(mod, nn.Conv2d | nn.Linear):
                self.shared_layer(node, name, mod, src)
        elif q is not None:
            self.site(node, name, mod, q, src)
        elif isinstance(mod, _KEEPS_GRID) and src in self.grid:
            _set(self.m, name, Regrid(mod, self.grid[src]))
            self.grid[node] = self.grid[src]
        elif isinstance(mod, nn.Conv2d | nn.Linear):
            self.layer(node, name, mod, src)

    def _reads(self, origin: object, q: nn.Module) -> None:
        """Quantizer `q` reads integer layer `origin` (when it is one, with no other reader)."""
        if origin in self.layers and len(origin.users) == 1:  # type: ignore[union-attr]
            self.read.add(origin)  # type: ignore[arg-type]
            if isinstance(q, BinaryAct):
                self.layers[origin].set_bias_rounding(torch.floor)  # type: ignore[index]

    def shared_site(
        self, node: fx.Node, name: str, mod: nn.Module, q: nn.Module, src: object
    ) -> None:
        """A quantizer module called at several sites (torchvision's ResNet calls one ReLU twice
        per block): one QDQAct for all of them."""
        if name not in self.shared:
            self.shared[name] = qdq = act_qdq(q)
            if qdq is not None:
                _set_quantizer(self.m, name, mod, qdq)
                self.report.acts.append(name)
        qdq = self.shared[name]
        if qdq is not None:
            self.grid[node], self.sites[node] = qdq, q
            self._reads(_skip_identity(src, self.mods), q)

    def site(self, node: fx.Node, name: str, mod: nn.Module, q: nn.Module, src: object) -> None:
        origin = _skip_identity(src, self.mods)
        pool = None  # conv -> max pool -> quantizer: quantize first (monotone, so equal)
        if (
            isinstance(origin, fx.Node)
            and origin.op == "call_module"
            and isinstance(self.mods[origin.target], nn.MaxPool2d)
            and len(origin.users) == 1
            and self.calls[origin.target] == 1
        ):
            pool, origin = origin, _skip_identity(origin.args[0], self.mods)
        layer = self.layers.get(origin) if len(getattr(origin, "users", ())) == 1 else None
        qdq = act_qdq(q, None if layer is None else layer.in_scale * float(layer.scale.min()))
        if qdq is None:
            return
        self._reads(origin, q)
        here: nn.Module = qdq
        if pool is not None and layer is not None:
            _set(self.m, pool.target, Regrid(nn.Sequential(qdq, self.mods[pool.target]), qdq))
            here = nn.Identity()
        _set_quantizer(self.m, name, mod, here)
        self.grid[node], self.sites[node] = qdq, q
        self.report.acts.append(name)

    def shared_layer(self, node: fx.Node, name: str, mod: nn.Module, src: object) -> None:
        """A conv / linear called at several places (an FPN detector's head, shared by its
        levels): integer when every call reads the codes of one quantizer (its own input
        quantizer, quant.act.sites=inputs), else float, as a float input would leave it."""
        if name in self.shared_layers and self.shared_layers[name] is None:
            return  # float already
        if name not in self.codes:
            self.report.float_layers[name] = "float weights"
            self.shared_layers[name] = None
            return
        inq = self.grid.get(src)  # type: ignore[arg-type]
        done = self.shared_layers.get(name)
        if done is None and inq is not None:  # the first call decides the integer form
            new = self.integer_layer(name, mod, inq)
            _set(self.m, name, new)
            self.shared_layers[name] = done = (new, inq, mod)
        if done is not None and inq is done[1]:
            self.layers[node] = done[0]
            return
        if done is not None:  # a call on another grid or on float: back to float
            _set(self.m, name, done[2])
            for n in [n for n in self.layers if n.target == name]:
                del self.layers[n]
                self.read.discard(n)
        self.shared_layers[name] = None
        self.report.float_layers[name] = "called at several places, not all on one grid"

    def integer_layer(self, name: str, mod: nn.Module, inq: QDQAct) -> _QDQLayer:
        """The QDQ form of conv / linear `name` reading codes of `inq`."""
        w = mod.quantized_weight() if isinstance(mod, QConv2d | QLinear) else mod.weight
        wide, _ = widen(*self.codes[name], code_span(inq.hi))
        c, s = _rescale(wide, w, name)
        layer_cls = QDQConv2d if isinstance(mod, nn.Conv2d) else QDQLinear
        return layer_cls(mod, c, s, inq.out_scale, name)  # type: ignore[arg-type]

    def layer(self, node: fx.Node, name: str, mod: nn.Module, src: object) -> None:
        if name not in self.codes:
            self.report.float_layers[name] = "float weights"
        elif src in self.grid:
            new = self.integer_layer(name, mod, self.grid[src])  # type: ignore[index]
            _set(self.m, name, new)
            self.layers[node] = new
        elif self.calib is None:
            self.report.float_layers[name] = "its input is not quantized"
        else:
            self.pending[node] = mod  # an 8-bit input on a calibrated range: requantize_inputs

    def requantize_inputs(self) -> None:
        """Convs behind an op the QAT model leaves float (ResNet-9's residual add): a uint8
        Q / DQ on the observed range of their input, then the same integer layer."""
        if not self.pending:
            return
        names = [n.target for n in self.pending]
        ranges, self.report.calib_images = observe_ranges(self.m, names, self.calib, "input")
        for node, mod in self.pending.items():
            name = node.target
            scale, zp = act_qparams(*ranges[name])
            inq = QDQAct(float(scale), int(zp), 0, 255)
            new = self.integer_layer(name, mod, inq)
            _set(self.m, name, nn.Sequential(inq, new))
            self.layers[node] = new
            self.report.requantized_inputs.append(name)
            reader = _quantizer_reading(node, self.sites, self.mods)
            if reader is not None:
                self._reads(node, self.sites[reader])

    def requantize_outputs(self) -> None:
        """Integer layers whose output no quantizer reads (ResNet's conv before the add): a
        uint8 Q / DQ on the observed range, clipped to what the quantizer after the add sees."""
        report = self.report
        calls: dict[str, list[fx.Node]] = {}  # a layer shared by several calls: one output Q
        for n in self.layers:
            calls.setdefault(n.target, []).append(n)  # type: ignore[arg-type]
        open_names = [
            name for name, nodes in calls.items() if any(n not in self.read for n in nodes)
        ]
        report.integer_layers = [name for name in calls if name not in open_names]
        if not open_names or self.calib is None:
            for name in open_names:
                report.float_layers[name] = "its output is not quantized (int8 weights)"
            return
        ranges, report.calib_images = observe_ranges(self.m, open_names, self.calib)
        for name in open_names:
            los, his = [], []
            for node in calls[name]:  # each call's clip of the observed range; their union
                lo, hi = ranges[name]
                bound = _add_then_quantizer(node, self.grid, self.mods)
                if bound is not None:  # beyond these the sum saturates the quantizer anyway
                    lo, hi = lo.clamp(min=bound[0]), hi.clamp(max=bound[1])
                flat = _flat_beyond(node, self.mods)
                if flat is not None:  # beyond these the activation after the layer is constant
                    lo, hi = lo.clamp(min=flat[0]), hi.clamp(max=flat[1])
                los.append(lo)
                his.append(hi)
            scale, zp = act_qparams(min(los), max(his))
            out = QDQAct(float(scale), int(zp), 0, 255)
            _set(self.m, name, nn.Sequential(self.m.get_submodule(name), out))
            report.requantized.append(name)
        report.integer_layers += report.requantized


def _quantizer_reading(
    node: fx.Node, sites: dict[fx.Node, nn.Module], mods: dict[str, nn.Module]
) -> fx.Node | None:
    """The quantizer site (in `sites`) that reads `node`'s output directly (through folded BNs),
    if any."""
    user = node
    while len(user.users) == 1:
        user = next(iter(user.users))
        if user.op != "call_module":
            return None
        if user in sites:
            return user
        if not isinstance(mods[user.target], nn.Identity):
            return None
    return None


def _value_range(q: QDQAct, side: str) -> tuple[float, float]:
    """The values a QDQAct saturates at: on its input side (where Q clamps) or its output."""
    scale, zp = (q.scale, q.zero_point) if side == "in" else (q.out_scale, q.out_zp)
    return (q.lo - zp) * scale, (q.hi - zp) * scale


def _add_then_quantizer(
    node: fx.Node, grid: dict[fx.Node, QDQAct], mods: dict[str, nn.Module]
) -> tuple[float, float] | None:
    """For y = layer(...) in `q(y + s)` with s on a grid and q a quantizer (ResNet's
    act2(bn2(conv2(.)) + shortcut)): the interval outside which a change of y cannot change
    q(y + s), since q saturates below its first level and above its last. None otherwise."""
    prev, user = node, next(iter(node.users)) if len(node.users) == 1 else None
    while (
        user is not None and user.op == "call_module" and isinstance(mods[user.target], nn.Identity)
    ):
        prev, user = user, next(iter(user.users)) if len(user.users) == 1 else None
    if user is None or user.op != "call_function" or user.target not in (operator.add, torch.add):
        return None
    if len(user.users) != 1 or len(user.args) != 2:
        return None
    act = next(iter(user.users))
    other = next((a for a in user.args if a is not prev and isinstance(a, fx.Node)), None)
    if act not in grid or other not in grid:
        return None
    q_lo, q_hi = _value_range(grid[act], "in")
    s_lo, s_hi = _value_range(grid[other], "out")
    return q_lo - s_hi, q_hi - s_lo


# activations constant below / above these inputs: a range beyond them only coarsens the 8
# bits a requantized output before them gets (ReLU sits before MobileNet's SE pool)
_FLAT_MODULES: dict[type[nn.Module], tuple[float, float]] = {
    nn.ReLU: (0.0, math.inf),
    nn.ReLU6: (0.0, 6.0),
    nn.Hardswish: (-3.0, math.inf),
    nn.Hardsigmoid: (-3.0, 3.0),
}
_FLAT_FUNCTIONS: dict[object, tuple[float, float]] = {
    torch.relu: (0.0, math.inf),
    F.relu: (0.0, math.inf),
    F.relu6: (0.0, 6.0),
    F.hardswish: (-3.0, math.inf),
    F.hardsigmoid: (-3.0, 3.0),
}


def _flat_beyond(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[float, float] | None:
    """For y = layer(...) whose only reader (through folded BNs) is an activation that is
    constant outside [lo, hi]: that interval. None otherwise."""
    user = node
    while len(user.users) == 1:
        user = next(iter(user.users))
        if user.op == "call_module" and isinstance(mods[user.target], nn.Identity):
            continue
        if user.op == "call_module":
            mod = mods[user.target]
            fn = mod.fn if isinstance(mod, Activation) else mod
            return _FLAT_MODULES.get(type(fn))
        if user.op == "call_function":
            return _FLAT_FUNCTIONS.get(user.target)
        if user.op == "call_method" and user.target == "relu":
            return 0.0, math.inf
        return None
    return None


def observe_ranges(
    model: nn.Module, names: list[str], batches: Iterable[torch.Tensor], where: str = "output"
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """The min / max of the outputs (or inputs) of layers `names` over `batches`, and the image
    count."""
    lo = {n: torch.tensor(math.inf) for n in names}
    hi = {n: torch.tensor(-math.inf) for n in names}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, out: torch.Tensor | None = None) -> None:
            seen = args[0] if out is None else out
            a, b = torch.aminmax(seen.detach().float())
            lo[name], hi[name] = torch.minimum(lo[name], a), torch.maximum(hi[name], b)

        return record

    handles = [
        model.get_submodule(n).register_forward_hook(hook(n))
        if where == "output"
        else model.get_submodule(n).register_forward_pre_hook(hook(n))
        for n in names
    ]
    images = 0
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                images += len(x)
    finally:
        for h in handles:
            h.remove()
    if not images:
        raise QDQError("calibration of the requantized layers got no batches")
    return {n: (lo[n], hi[n]) for n in names}, images


def check_exact(model: nn.Module, qdq: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How far the QDQ model is from the fake-quant model on `x`: max |logit diff|, the same
    relative to the mean spread (max - min) of the fake-quant logits, and top-1 agreement (%)."""
    with torch.no_grad():
        a, b = model.eval()(x), qdq.eval()(x)
    spread = (a.max(1).values - a.min(1).values).mean().clamp_min(1e-12)
    return {
        "max_abs_diff": (a - b).abs().max().item(),
        "rel_diff": ((a - b).abs().max() / spread).item(),
        "top1_agreement": 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item(),
    }
