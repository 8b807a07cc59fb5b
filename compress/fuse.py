"""BN fusion: fold batch normalization into the layer before it, exactly, in eval mode.

Kinds of fold, chosen per BN by what surrounds it (found by tracing the model with FX):
- normal: conv -> BN becomes one conv with w' = w * s, b' = (b - mean) * s + beta,
  s = gamma / sqrt(var + eps). A quantized conv's weight is baked (w' = Q(w) * s, float).
- bias-only, for a BN that feeds a binary activation: sign(BN(y)) = sign(y + b') with
  b' = beta * sqrt(var + eps) / |gamma| - mean, so only the bias changes and the weights stay
  binary. gamma < 0 flips that output channel (weights and bias), gamma = 0 makes the channel
  constant (sign(beta)).
- scale (`exact=True`): the BN becomes an `OutputScale` after the layer, y * s + b' per output
  channel, with the very s and b' eval-mode BN computes with, so the fused model computes bit
  for bit what the unfused one did. A quantizer is not scale-equivariant (DoReFa normalises by
  max|tanh w|, LSQ and PACT clip, ternary thresholds at a fraction of mean|w|), so the BN
  cannot go into the latent weights; and a baked Q(w) * s, or any normal fold, changes the
  conv's float rounding, which moves a value that a k-bit activation quantizer after it rounds
  across a level now and then (seen: max |logit diff| 0.03 on a trained w4a4 ResNet-20). So
  with `exact=True` every BN after a quantized layer, and every BN whose output reaches a
  rounding activation quantizer, is folded this way; the layer keeps its quantizer and weights.
- latent (`exact=True`, int8 weights with nothing rounding after the BN): w' = w * s into the
  latent weight, the quantizer kept. Symmetric per-channel int8 is scale-equivariant,
  Q(s w) = s Q(w) (the scale is max|s w| / 127 = |s| max|w| / 127 and round is odd), so the
  layer stays an int8 layer (compress.quant.int8).
A max pool between conv and BN is allowed where it commutes with the fold (per-channel shifts,
and scales that are not negative). BNs that cannot be folded are left in place and reported.

The default (`exact=False`) folds everything into the layers' weights, Q(w) * s baked: what
compress.deploy.qdq turns into integer codes times a per-channel scale, and what runs fastest.
It folds an `OutputScale` of an exactly fused model as it folds a BN.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compress.detection.models import core_of
from compress.errors import CheckpointError
from compress.models.blocks import Activation, ChannelShuffle
from compress.models.resnet import Shortcut
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import BinaryAct, BinaryWeight, Quantizer, TernaryWeight

log = logging.getLogger(__name__)
MODES = ("normal", "bias", "scale", "latent")


class OutputScale(nn.Module):
    """A BN folded as a per-output-channel scale and bias after its layer: y * scale + bias.

    Computed by the batch-norm kernel with unit statistics (mean 0, variance 1, eps 0), from
    the scale and bias that kernel computed for the BN (`from_bn`): the same arithmetic on the
    same numbers, so its output is bit for bit the BN's (CPU, contiguous or channels-last
    input). Parameters `scale` and `bias` are what a checkpoint holds."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # the unit statistics: not weights, so not in the state_dict
        self.register_buffer("zero", torch.zeros(num_features), persistent=False)
        self.register_buffer("one", torch.ones(num_features), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_bn(cls, bn: nn.BatchNorm2d | nn.BatchNorm1d) -> OutputScale:
        """The eval-mode BN's own per-channel terms, read back from its kernel: with mean 0 and
        bias 0, BN(1) is the scale gamma / sqrt(var + eps); BN(0) is the bias."""
        var, n = bn.running_var, bn.num_features
        zero = torch.zeros_like(var)
        scale = F.batch_norm(var.new_ones(1, n), zero, var, bn.weight, zero, False, 0.0, bn.eps)
        bias = F.batch_norm(
            var.new_zeros(1, n), bn.running_mean, var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        out = cls(n).to(var.device, var.dtype)
        out.scale.copy_(scale.view(n))
        out.bias.copy_(bias.view(n))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.zero, self.one, self.scale, self.bias, False, 0.0, 0.0)

    def extra_repr(self) -> str:
        return str(self.num_features)


# what FX keeps whole when tracing a model for folding (and for compress.deploy.qdq)
LEAF_MODULES = (
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.BatchNorm1d,
    Activation,
    Quantizer,  # an activation quantizer at a ReLU call site (models without Activation slots)
    ChannelShuffle,
    Shortcut,
    OutputScale,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_BIG = 1e30  # bias of a channel whose BN has gamma = 0: its sign never changes


class LeafTracer(fx.Tracer):
    """An FX tracer that keeps convs, BNs, activations, quantizers and pools whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAF_MODULES) or super().is_leaf_module(m, qualname)


@dataclass
class Fold:
    conv: str  # qualified name of the conv / linear
    bn: str  # qualified name of the BN
    mode: str  # one of MODES


@dataclass
class Plan:
    folds: list[Fold]
    skipped: dict[str, str]  # BN name -> why it stays


BNS = (nn.BatchNorm2d, nn.BatchNorm1d)


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rounds(m: nn.Module | None) -> bool:
    """An activation quantizer that rounds (in an Activation slot or at a ReLU call site):
    every kind but fp32, which is a ReLU."""
    q = m.fn if isinstance(m, Activation) else m
    return isinstance(q, Quantizer) and q.kind != "fp32"


def _quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QConv2d | QLinear) and layer.weight_quant.kind != "fp32"


def _reaching_rounding(graph: fx.Graph, mod: Callable[[fx.Node], nn.Module | None]) -> set:
    """The nodes whose output reaches a rounding activation quantizer (one pass, users first)."""
    reach: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if any(_rounds(mod(u)) or u in reach for u in node.users):
            reach.add(node)
    return reach


def plan_fusion(model: nn.Module, exact: bool = False) -> Plan:
    """Find every BN and decide how (or whether) it can be folded (see the module docstring).

    `exact=False` also folds the `OutputScale`s of an exactly fused model into their layers."""
    graph = LeafTracer().trace(model)
    mods = dict(model.named_modules())

    def mod(node: fx.Node) -> nn.Module | None:
        return mods.get(node.target) if node.op == "call_module" else None

    foldable = BNS if exact else (*BNS, OutputScale)
    reach = _reaching_rounding(graph, mod) if exact else set()
    folds, skipped = [], {}
    for node in graph.nodes:
        bn = mod(node)
        if not isinstance(bn, foldable):
            continue
        name = node.target
        if isinstance(bn, BNS) and bn.running_var is None:
            skipped[name] = "no running statistics (track_running_stats=False)"
            continue
        user = _single_user(node)
        act = mod(user) if user is not None else None
        binary_next = isinstance(getattr(act, "fn", act), BinaryAct)
        src, pooled = node.args[0], False
        while isinstance(mod(src), nn.Identity | nn.MaxPool2d) and len(src.users) == 1:
            pooled |= isinstance(mod(src), nn.MaxPool2d)
            src = src.args[0]
        conv = mod(src) if isinstance(src, fx.Node) else None
        if not isinstance(conv, nn.Conv2d | nn.Linear):
            skipped[name] = "no conv or linear layer directly before it"
            continue
        if _single_user(src) is None:
            skipped[name] = f"{src.target} also feeds other layers"
            continue
        flips = bool((_bn_terms(bn)[0] < 0).any())
        if exact and (_quantized(conv) or node in reach):
            # int8 weights are scale-equivariant: the BN's scale goes into the latent weight
            # where nothing rounds after it (a conv's float rounding changes with the fold)
            int8 = _quantized(conv) and conv.weight_quant.kind == "int8"
            latent = int8 and node not in reach and not (pooled and flips)
            folds.append(Fold(src.target, name, "latent" if latent else "scale"))
        elif pooled and flips:
            what = "a flip" if binary_next else "the scale"
            skipped[name] = f"negative gamma after a max pool ({what} does not commute)"
        else:
            folds.append(Fold(src.target, name, "bias" if binary_next else "normal"))
    return Plan(folds, skipped)


def _bn_terms(bn: nn.Module) -> tuple[torch.Tensor, ...]:
    """(gamma, beta, mean, std) in float64; an OutputScale is gamma = scale, beta = bias."""
    if isinstance(bn, OutputScale):
        scale = bn.scale.detach().double()
        return scale, bn.bias.detach().double(), torch.zeros_like(scale), torch.ones_like(scale)
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(std)
    return gamma, beta, bn.running_mean.double(), std


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _with_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
    return layer.bias


@torch.no_grad()
def _fold_into_weight(layer: nn.Module, w: torch.Tensor, bn: nn.Module) -> None:
    """layer.weight = w * s, layer.bias = (b - mean) * s + beta, s = gamma / std (float64)."""
    gamma, beta, mean, std = _bn_terms(bn)
    scale = gamma / std
    shape = (-1,) + (1,) * (w.dim() - 1)
    layer.weight.copy_((w.double() * scale.view(shape)).to(w.dtype))
    bias = _with_bias(layer)
    bias.copy_(((bias.double() - mean) * scale + beta).to(bias.dtype))


@torch.no_grad()
def _fold_normal(model: nn.Module, fold: Fold) -> None:
    layer, bn = model.get_submodule(fold.conv), model.get_submodule(fold.bn)
    w = layer.quantized_weight() if isinstance(layer, QConv2d | QLinear) else layer.weight
    if isinstance(layer, QConv2d | QLinear):  # the fused weight is a float tensor now
        layer = layer.with_float_weight()
        _set(model, fold.conv, layer)
    _fold_into_weight(layer, w, bn)
    _set(model, fold.bn, nn.Identity())


@torch.no_grad()
def _fold_latent(model: nn.Module, fold: Fold) -> None:
    """Into the latent weight of an int8 layer, its quantizer kept: Q(s w) = s Q(w)."""
    layer = model.get_submodule(fold.conv)
    _fold_into_weight(layer, layer.weight.detach().clone(), model.get_submodule(fold.bn))
    _set(model, fold.bn, nn.Identity())


def _fold_scale(model: nn.Module, fold: Fold) -> None:
    _set(model, fold.bn, OutputScale.from_bn(model.get_submodule(fold.bn)))


@torch.no_grad()
def _fold_bias(model: nn.Module, fold: Fold) -> None:
    layer, bn = model.get_submodule(fold.conv), model.get_submodule(fold.bn)
    gamma, beta, mean, std = _bn_terms(bn)
    wq = getattr(layer, "weight_quant", None)
    if isinstance(wq, BinaryWeight | TernaryWeight):
        # Store the quantized values as the latent weights (idempotent for binary / ternary),
        # so that a channel flip below flips the quantized weights exactly.
        layer.weight.copy_(layer.quantized_weight())
        if isinstance(wq, BinaryWeight):
            wq.center = False
    bias = _with_bias(layer)
    b = bias.double()
    neg, zero = gamma < 0, gamma == 0
    safe = torch.where(zero, torch.ones_like(gamma), gamma.abs())
    # sign(gamma (y - mean) / std + beta) = sign(+-y + b_new), the sign taken from gamma
    new = torch.where(neg, -(b - mean) + beta * std / safe, (b - mean) + beta * std / safe)
    new = torch.where(zero, torch.where(beta >= 0, _BIG, -_BIG), new)
    if neg.any():
        layer.weight[neg] = -layer.weight[neg]
    if zero.any():
        layer.weight[zero] = 0.0 if wq is None or wq.kind == "fp32" else layer.weight[zero]
    bias.copy_(new.to(bias.dtype))
    _set(model, fold.bn, nn.Identity())


FOLDERS: dict[str, Callable[[nn.Module, Fold], None]] = {
    "normal": _fold_normal,
    "bias": _fold_bias,
    "scale": _fold_scale,
    "latent": _fold_latent,
}


def fuse_bn_(model: nn.Module, exact: bool = False) -> Plan:
    """Fold every foldable BN of `model` (in place, eval mode); returns what was done.

    `exact=True` keeps a quantized model's every rounding as it was: a BN after a quantized
    layer, or whose output reaches a rounding activation quantizer, becomes an `OutputScale`
    (an int8 layer's may go into its latent weight), the rest fold normally; the fused model
    computes bit for bit what the unfused one did where it rounds. `exact=False` (what
    compress.deploy.qdq and the benchmarks use) folds all into the weights, which changes the
    float rounding of the convs (see the module docstring), and folds OutputScales too.

    A model in training mode is switched to eval mode first, with a notice: folding uses the
    running statistics, which is what eval mode computes with.
    """
    if model.training:
        log.warning("fuse: the model was in training mode; switched to eval mode")
    model.eval()
    whole, model = model, core_of(model)  # a detector's core (the names are the core's)
    done: list[Fold] = []
    while True:  # again after folding: a fold can make the next BN foldable (BN -> BN chains)
        plan = plan_fusion(model, exact)
        if not plan.folds:
            break
        for fold in plan.folds:  # distinct layers and BNs, each a leaf swapped in place
            FOLDERS[fold.mode](model, fold)
        done += plan.folds
    for name, why in plan.skipped.items():
        log.warning("fuse: kept %s: %s", name, why)
    # the record of an earlier fusion stays; a fold of one of its OutputScales replaces it
    record = {bn: [conv, bn, mode] for conv, bn, mode in getattr(whole, "fused", None) or []}
    record.update({f.bn: [f.conv, f.bn, f.mode] for f in done})
    whole.fused = list(record.values())
    return Plan(done, plan.skipped)


def apply_fused_structure_(model: nn.Module, folds: list[list[str]]) -> nn.Module:
    """Give a freshly built model the layout of a fused one (BNs gone or OutputScales, biases
    added, normally folded quantized layers turned float) so a fused state_dict loads into it."""
    whole, model = model, core_of(model)
    for conv, bn, mode in folds:
        if mode not in MODES:
            raise CheckpointError(
                f"fused fold {conv} <- {bn} has mode {mode!r}: expected one of {', '.join(MODES)}"
            )
        if mode == "scale":
            _set(model, bn, OutputScale(model.get_submodule(bn).num_features))
            continue
        layer = model.get_submodule(conv)
        if mode == "normal" and isinstance(layer, QConv2d | QLinear):
            layer = layer.with_float_weight()
            _set(model, conv, layer)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        if mode == "bias" and isinstance(getattr(layer, "weight_quant", None), BinaryWeight):
            layer.weight_quant.center = False
        _set(model, bn, nn.Identity())
    whole.fused = [list(f) for f in folds]
    return whole


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())


__all__ = [
    "LEAF_MODULES",
    "MODES",
    "Fold",
    "LeafTracer",
    "OutputScale",
    "Plan",
    "apply_fused_structure_",
    "count_bn",
    "fuse_bn_",
    "plan_fusion",
]
