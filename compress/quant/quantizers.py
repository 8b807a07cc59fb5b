"""Weight and activation quantizers as nn.Modules, built by kind from a config dict.

A quantizer maps a float tensor to its quantized value, still in float (fake quantization),
with a defined gradient; `bits` is its storage width (32 for fp32, 2 ternary, 1 binary).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from compress.config import (
    ACT_KINDS,
    WEIGHT_KINDS,
    ActQuantConfig,
    WeightQuantConfig,
    check_known,
    validate_quantizer,
)
from compress.quant import primitives as P
from compress.quant.base import Quantizer
from compress.quant.int8 import Int8Act, Int8Weight


# ---------------------------------------------------------------- weights
class FP32Weight(Quantizer):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w


class DoReFaWeight(Quantizer):
    kind = "dorefa"

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return P.dorefa_weight(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class TernaryWeight(Quantizer):
    kind, bits = "ternary", 2

    def __init__(self, gap: float = 0.7, scale: bool = True) -> None:
        super().__init__()
        self.gap, self.scaled = gap, scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return P.ternary_weight(w, self.gap, self.scaled)

    def extra_repr(self) -> str:
        return f"gap={self.gap}, scale={self.scaled}"


class BinaryWeight(Quantizer):
    kind, bits = "binary", 1

    def __init__(self, scale: bool = True, center: bool = False, clip: bool = False) -> None:
        super().__init__()
        self.scaled, self.center, self.clip = scale, center, clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return P.binary_weight(w, self.scaled, self.center)

    def extra_repr(self) -> str:
        return f"scale={self.scaled}, center={self.center}, clip={self.clip}"


# ---------------------------------------------------------------- activations
class FP32Act(Quantizer):
    """Full-precision activation: ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)


class DoReFaAct(Quantizer):
    kind = "dorefa"

    def __init__(self, bits: int, grad: str = "saturate_ste") -> None:
        super().__init__()
        self.bits, self.grad = bits, grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.dorefa_act(x, self.bits, self.grad)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grad={self.grad}"


class PACTAct(Quantizer):
    """DoReFa's k-bit activation on a learned range [0, alpha] (alpha starts at `clip_init`)."""

    kind = "pact"

    def __init__(self, bits: int, clip_init: float = 6.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(clip_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.pact_act(x, self.alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={self.alpha.item():.3g}"


class TernaryAct(Quantizer):
    kind, bits = "ternary", 2

    def __init__(self, threshold: float = 0.5, grad: str = "saturate_ste") -> None:
        super().__init__()
        self.threshold, self.grad = threshold, grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.ternary_act(x, self.threshold, self.grad)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, grad={self.grad}"


class BinaryAct(Quantizer):
    kind, bits = "binary", 1

    def __init__(self, grad: str = "saturate_ste") -> None:
        super().__init__()
        self.grad = grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return P.binary_act(x, self.grad)

    def extra_repr(self) -> str:
        return f"grad={self.grad}"


KINDS = WEIGHT_KINDS  # the choices and checks live in compress.config
_W, _A = WeightQuantConfig, ActQuantConfig  # their defaults


def _validate(prefix: str, cfg: dict[str, Any], kinds: tuple[str, ...] = KINDS) -> str:
    """Range checks of a quantizer dict (compress.config.validate_quantizer); returns its kind."""
    return validate_quantizer(cfg, prefix, kinds)


def _known(prefix: str, cfg: dict[str, Any], allowed: set[str]) -> None:
    check_known(prefix, cfg, allowed)


WEIGHT_KEYS = {f.name for f in fields(WeightQuantConfig)}
ACT_KEYS = {f.name for f in fields(ActQuantConfig)}


def weight_quantizer(cfg: dict[str, Any], prefix: str = "quant.weight") -> Quantizer:
    """Build a weight quantizer from {kind, bits, gap, scale, center, clip}; options that do
    not apply to the kind are ignored, so one schema covers every kind."""
    _known(prefix, cfg, WEIGHT_KEYS)
    kind = _validate(prefix, cfg)
    if kind == "dorefa":
        return DoReFaWeight(cfg["bits"])
    if kind == "ternary":
        return TernaryWeight(cfg.get("gap", _W.gap), cfg.get("scale", _W.scale))
    if kind == "binary":
        return BinaryWeight(
            cfg.get("scale", _W.scale), cfg.get("center", _W.center), cfg.get("clip", _W.clip)
        )
    if kind == "int8":
        return Int8Weight()
    return FP32Weight()


def act_quantizer(cfg: dict[str, Any], prefix: str = "quant.act") -> Quantizer:
    """Build an activation quantizer from {kind, bits, threshold, grad, clip_init}."""
    _known(prefix, cfg, ACT_KEYS)
    kind = _validate(prefix, cfg, ACT_KINDS)
    grad = cfg.get("grad", _A.grad)
    if kind == "dorefa":
        return DoReFaAct(cfg["bits"], grad)
    if kind == "pact":
        return PACTAct(cfg["bits"], float(cfg.get("clip_init", _A.clip_init)))
    if kind == "ternary":
        return TernaryAct(cfg.get("threshold", _A.threshold), grad)
    if kind == "binary":
        return BinaryAct(grad)
    if kind == "int8":
        return Int8Act()
    return FP32Act()
