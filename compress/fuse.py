"""BN fusion: fold batch normalization into the layer before it, exactly, in eval mode.

Two kinds of fold, chosen per BN by what surrounds it (found by tracing the model with FX):
- normal: conv -> BN becomes one conv with w' = w * s, b' = (b - mean) * s + beta,
  s = gamma / sqrt(var + eps). A quantized conv's weight is baked (w' = Q(w) * s).
- bias-only, for a BN that feeds a binary activation: sign(BN(y)) = sign(y + b') with
  b' = beta * sqrt(var + eps) / |gamma| - mean, so only the bias changes and the weights stay
  binary. gamma < 0 flips that output channel (weights and bias), gamma = 0 makes the channel
  constant (sign(beta)).
A max pool between conv and BN is allowed where it commutes with the fold (per-channel shifts,
and scales that are not negative). BNs that cannot be folded are left in place and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from compress.models.blocks import Activation, ChannelShuffle
from compress.models.resnet import Shortcut
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import BinaryAct, BinaryWeight, Quantizer, TernaryWeight

log = logging.getLogger(__name__)

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
    mode: str  # "normal" or "bias"


@dataclass
class Plan:
    folds: list[Fold]
    skipped: dict[str, str]  # BN name -> why it stays


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def plan_fusion(model: nn.Module) -> Plan:
    """Find every BN and decide how (or whether) it can be folded."""
    graph = LeafTracer().trace(model)
    mods = dict(model.named_modules())

    def mod(node: fx.Node) -> nn.Module | None:
        return mods.get(node.target) if node.op == "call_module" else None

    folds, skipped = [], {}
    for node in graph.nodes:
        bn = mod(node)
        if not isinstance(bn, nn.BatchNorm2d | nn.BatchNorm1d):
            continue
        name = node.target
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
        gamma = bn.weight.detach() if bn.affine else torch.ones(bn.num_features)
        if binary_next:
            if pooled and (gamma < 0).any():
                skipped[name] = "negative gamma after a max pool (a flip does not commute)"
                continue
            folds.append(Fold(src.target, name, "bias"))
        else:
            if pooled and (gamma < 0).any():
                skipped[name] = "negative gamma after a max pool (the scale does not commute)"
                continue
            folds.append(Fold(src.target, name, "normal"))
    return Plan(folds, skipped)


def _bn_terms(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> tuple[torch.Tensor, ...]:
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(std)
    return gamma, beta, bn.running_mean.double(), std


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _with_bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
    return layer.bias


@torch.no_grad()
def _fold_normal(model: nn.Module, fold: Fold) -> None:
    layer, bn = model.get_submodule(fold.conv), model.get_submodule(fold.bn)
    gamma, beta, mean, std = _bn_terms(bn)
    scale = gamma / std
    w = layer.quantized_weight() if isinstance(layer, QConv2d | QLinear) else layer.weight
    if isinstance(layer, QConv2d | QLinear):  # the fused weight is a float tensor now
        layer = layer.to_float()
        _set(model, fold.conv, layer)
    shape = (-1,) + (1,) * (w.dim() - 1)
    layer.weight.copy_((w.double() * scale.view(shape)).to(w.dtype))
    bias = _with_bias(layer)
    bias.copy_(((bias.double() - mean) * scale + beta).to(bias.dtype))
    _set(model, fold.bn, nn.Identity())


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


def fuse_bn_(model: nn.Module) -> Plan:
    """Fold every foldable BN of `model` (in place, eval mode); returns what was done.

    A model in training mode is switched to eval mode first, with a notice: folding uses the
    running statistics, which is what eval mode computes with.
    """
    if model.training:
        log.warning("fuse: the model was in training mode; switched to eval mode")
    model.eval()
    done: list[Fold] = []
    while True:  # one fold at a time: a fold can make the next BN foldable (BN -> BN chains)
        plan = plan_fusion(model)
        if not plan.folds:
            break
        fold = plan.folds[0]
        (_fold_bias if fold.mode == "bias" else _fold_normal)(model, fold)
        done.append(fold)
    for name, why in plan.skipped.items():
        log.warning("fuse: kept %s: %s", name, why)
    model.fused = [[f.conv, f.bn, f.mode] for f in done]
    return Plan(done, plan.skipped)


def apply_fused_structure_(model: nn.Module, folds: list[list[str]]) -> nn.Module:
    """Give a freshly built model the layout of a fused one (BNs gone, biases added, normally
    folded quantized layers turned float) so a fused state_dict loads into it."""
    for conv, bn, mode in folds:
        layer = model.get_submodule(conv)
        if mode == "normal" and isinstance(layer, QConv2d | QLinear):
            layer = layer.to_float()
            _set(model, conv, layer)
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        if mode == "bias" and isinstance(getattr(layer, "weight_quant", None), BinaryWeight):
            layer.weight_quant.center = False
        _set(model, bn, nn.Identity())
    model.fused = [list(f) for f in folds]
    return model


def count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules())


__all__ = [
    "LEAF_MODULES",
    "Fold",
    "LeafTracer",
    "Plan",
    "apply_fused_structure_",
    "count_bn",
    "fuse_bn_",
    "plan_fusion",
]
