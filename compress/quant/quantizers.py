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
from compress.quant import lsq as L
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


class LSQWeight(Quantizer):
    """LSQ weights (Esser et al., 2020; compress.quant.lsq): signed b-bit codes times a learned
    step per output channel, the step gradient scaled by 1 / sqrt(elements per channel * Q_P).

    The step is initialised from the weight, 2 mean|w_c| / sqrt(Q_P), when the quantizer is
    attached to its layer (`quantize_`, `QConv2d.from_float`), or at its first forward if it
    never was (the step has no shape before). Weights need no batch, so every DDP rank builds
    the same steps. `initialized` (a buffer) is in every checkpoint beside the steps: a model
    rebuilt from one (quantize_, then load_state_dict) holds the trained steps, not new ones."""

    kind, scaled = "lsq", True

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.qn, self.qp = L.weight_bounds(bits)
        self.step = nn.Parameter(torch.ones(0))  # (C_out,) once attached
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def init_step_(self, w: torch.Tensor) -> None:
        s = L.init_step(w, self.qp, per_channel=True).to(w.device)
        if self.step.shape == s.shape:
            self.step.copy_(s)
        else:
            self.step = nn.Parameter(s)
        self.initialized.fill_(True)

    def attach_(self, weight: torch.Tensor) -> None:
        self.init_step_(weight)

    @torch.no_grad()
    def keep_out_channels_(self, idx: torch.Tensor) -> None:
        if self.step.numel():
            self.step = nn.Parameter(self.step[idx.to(self.step.device)].clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.step.numel() == 0:
            self.init_step_(w)
        elif self.step.shape[0] != w.shape[0]:
            raise RuntimeError(
                f"LSQ weight step has {self.step.shape[0]} channels but the weight "
                f"{w.shape[0]}: a layer thinned after quantization must thin its quantizer "
                "too (Quantizer.keep_out_channels_)"
            )
        g = L.grad_scale(w[0].numel(), self.qp)
        return L.lsq_quantize(w, self.step, self.qn, self.qp, g)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes of `w` (float dtype), in [-Q_N, Q_P]."""
        return L.codes(w, self.step, self.qn, self.qp)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, codes=[{-self.qn}, {self.qp}], channels={self.step.numel()}"


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


class LSQAct(Quantizer):
    """LSQ activations (Esser et al., 2020; compress.quant.lsq): b-bit codes times one learned
    step, the step gradient scaled by 1 / sqrt(features per sample * Q_P). Unsigned codes
    [0, 2^b - 1] by default: the clamp at 0 subsumes the ReLU the quantizer replaces (at a
    ReLU6 site the learned range replaces ReLU6's clip, as PACT's does); `signed`: codes
    [-2^(b-1), 2^(b-1) - 1], for a site whose input can be negative.

    The step (a scalar Parameter, 1 until then) is initialised from the first batch seen in
    training mode (`lsq.init_act_step`); evaluation never changes it. `initialized` (a buffer)
    is in every checkpoint, so a resumed or rebuilt model keeps its trained step. Under DDP
    each rank initialises from its own first batch: the ranks' steps start close but not equal
    (DDP averages gradients, not values), unless the model saw one batch before it was wrapped.
    """

    kind = "lsq"

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__()
        self.bits, self.signed = bits, signed
        self.qn, self.qp = L.act_bounds(bits, signed)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen = False  # `initialized` read once: no host sync per training step after

    @torch.no_grad()
    def init_step_(self, x: torch.Tensor) -> None:
        self.step.copy_(L.init_act_step(x, self.qp, self.signed))
        self.initialized.fill_(True)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._seen = False  # the loaded `initialized` decides
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self._seen:
            if not bool(self.initialized):
                self.init_step_(x)
            self._seen = True
        n = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        return L.lsq_quantize(x, self.step, self.qn, self.qp, L.grad_scale(n, self.qp))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={self.step.item():.3g}"


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
    if kind == "lsq":
        return LSQWeight(cfg["bits"])
    return FP32Weight()


def act_quantizer(cfg: dict[str, Any], prefix: str = "quant.act") -> Quantizer:
    """Build an activation quantizer from {kind, bits, threshold, grad, clip_init, signed}."""
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
    if kind == "lsq":
        return LSQAct(cfg["bits"], bool(cfg.get("signed", _A.signed)))
    return FP32Act()
