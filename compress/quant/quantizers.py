"""Weight and activation quantizers as nn.Modules, built by kind from a config dict.

A quantizer maps a float tensor to its quantized value, still in float (fake quantization),
with a defined gradient; `bits` is its storage width (32 for fp32, 2 ternary, 1 binary).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from compress.errors import ConfigError, check, check_choice
from compress.quant import primitives as P


class Quantizer(nn.Module):
    bits: int = 32
    kind: str = "fp32"
    scaled: bool = False  # stores one fp32 scale per output channel


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


KINDS = ("fp32", "dorefa", "ternary", "binary")
ACT_KINDS = (*KINDS, "pact")


def _validate(prefix: str, cfg: dict[str, Any], kinds: tuple[str, ...] = KINDS) -> str:
    kind = cfg.get("kind", "fp32")
    check_choice(f"{prefix}.kind", kind, kinds)
    if kind in ("dorefa", "pact"):
        bits = cfg.get("bits")
        check(
            isinstance(bits, int) and 2 <= bits <= 16,
            f"{prefix}.bits",
            bits,
            f"an integer from 2 to 16 for kind={kind} (use kind=ternary or binary below 2)",
        )
    if kind == "pact":
        clip = cfg.get("clip_init", 6.0)
        check(
            isinstance(clip, (int, float))
            and not isinstance(clip, bool)
            and math.isfinite(clip)
            and clip > 0,
            f"{prefix}.clip_init",
            clip,
            "a starting clip value > 0",
        )
        check(
            cfg.get("grad", "saturate_ste") == "saturate_ste",
            f"{prefix}.grad",
            cfg.get("grad"),
            "saturate_ste for kind=pact (its gradient is defined by the learned clip)",
        )
    if "grad" in cfg:
        check_choice(f"{prefix}.grad", cfg["grad"], P.GRAD_MODES)
    if "gap" in cfg:
        check(cfg["gap"] > 0, f"{prefix}.gap", cfg["gap"], "a ternary threshold gap > 0")
    if "threshold" in cfg:
        check(cfg["threshold"] >= 0, f"{prefix}.threshold", cfg["threshold"], "a value >= 0")
    return kind


def _known(prefix: str, cfg: dict[str, Any], allowed: set[str]) -> None:
    extra = set(cfg) - allowed
    if extra:
        raise ConfigError(
            f"{prefix}.{sorted(extra)[0]} is not a known key: expected one of "
            + ", ".join(sorted(allowed))
        )


WEIGHT_KEYS = {"kind", "bits", "gap", "scale", "center", "clip"}
ACT_KEYS = {"kind", "bits", "threshold", "grad", "clip_init"}


def weight_quantizer(cfg: dict[str, Any], prefix: str = "quant.weight") -> Quantizer:
    """Build a weight quantizer from {kind, bits, gap, scale, center, clip}; options that do
    not apply to the kind are ignored, so one schema covers every kind."""
    _known(prefix, cfg, WEIGHT_KEYS)
    kind = _validate(prefix, cfg)
    if kind == "dorefa":
        return DoReFaWeight(cfg["bits"])
    if kind == "ternary":
        return TernaryWeight(cfg.get("gap", 0.7), cfg.get("scale", True))
    if kind == "binary":
        return BinaryWeight(
            cfg.get("scale", True), cfg.get("center", False), cfg.get("clip", False)
        )
    return FP32Weight()


def act_quantizer(cfg: dict[str, Any], prefix: str = "quant.act") -> Quantizer:
    """Build an activation quantizer from {kind, bits, threshold, grad, clip_init}."""
    _known(prefix, cfg, ACT_KEYS)
    kind = _validate(prefix, cfg, ACT_KINDS)
    grad = cfg.get("grad", "saturate_ste")
    if kind == "dorefa":
        return DoReFaAct(cfg["bits"], grad)
    if kind == "pact":
        return PACTAct(cfg["bits"], float(cfg.get("clip_init", 6.0)))
    if kind == "ternary":
        return TernaryAct(cfg.get("threshold", 0.5), grad)
    if kind == "binary":
        return BinaryAct(grad)
    return FP32Act()
