"""quantize_(model, cfg): turn a float model into a quantization-aware one, in place.

cfg (the `quant` config group, as a dict):
  weight: {kind: fp32|dorefa|ternary|binary, bits, gap, scale, center, clip}
  act:    {kind: fp32|dorefa|pact|ternary|binary, bits, threshold, grad, clip_init}
  keep_first_last: keep the first conv and the classifier full precision (default true)
  keep: names of further conv / linear layers to keep full precision
Weights: every Conv2d / Linear not kept becomes a QConv2d / QLinear sharing its parameters.
Activations: every `Activation` slot of the model gets the activation quantizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.engine import Callback
from compress.errors import ConfigError
from compress.models.blocks import Activation
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import BinaryWeight, act_quantizer, weight_quantizer

QUANT_KEYS = {"name", "weight", "act", "keep", "keep_first_last"}


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def kept_layers(model: nn.Module, cfg: dict[str, Any]) -> list[str]:
    """Names of the conv / linear layers that stay full precision under `cfg`."""
    names = [n for n, _ in _layers(model)]
    keep = list(cfg.get("keep") or [])
    for n in keep:
        if n not in names:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"quant.keep: the model has no conv or linear layer named {n!r} "
                f"(its layers: {shown})"
            )
    if cfg.get("keep_first_last", True) and names:
        keep += [names[0], names[-1]]
    return sorted(set(keep), key=names.index)


def validate(cfg: dict[str, Any]) -> None:
    """Check a quant config without building anything (start-up validation)."""
    extra = set(cfg) - QUANT_KEYS
    if extra:
        raise ConfigError(
            f"quant.{sorted(extra)[0]} is not a known key: expected one of "
            + ", ".join(sorted(QUANT_KEYS))
        )
    weight_quantizer(dict(cfg.get("weight") or {}))
    act_quantizer(dict(cfg.get("act") or {}))


def is_quantized(cfg: dict[str, Any] | None) -> bool:
    if not cfg:
        return False
    return (cfg.get("weight") or {}).get("kind", "fp32") != "fp32" or (cfg.get("act") or {}).get(
        "kind", "fp32"
    ) != "fp32"


def quantize_(model: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    """Swap layers and activations for their quantized versions as `cfg` says (in place)."""
    validate(cfg)
    keep = set(kept_layers(model, cfg))
    wcfg, acfg = dict(cfg.get("weight") or {}), dict(cfg.get("act") or {})
    if wcfg.get("kind", "fp32") != "fp32":
        for name, m in _layers(model):
            if name in keep or isinstance(m, QConv2d | QLinear):
                continue
            qcls = QConv2d if isinstance(m, nn.Conv2d) else QLinear
            _set(model, name, qcls.from_float(m, weight_quantizer(wcfg)))
    if acfg.get("kind", "fp32") != "fp32":
        for m in model.modules():
            if isinstance(m, Activation):
                m.fn = act_quantizer(acfg)
    model.quant_config = dict(cfg)
    return model


def to_float(model: nn.Module) -> nn.Module:
    """Undo `quantize_`: float layers (same parameters) and ReLU activations (in place)."""
    for name, m in _layers(model):
        if isinstance(m, QConv2d | QLinear):
            _set(model, name, m.to_float())
    for m in model.modules():
        if isinstance(m, Activation):
            m.fn = nn.ReLU()
    model.quant_config = None
    return model


def quant_label(cfg: dict[str, Any] | None) -> str:
    """A short name derived from the settings themselves: fp32, w4a4, wbab, wta32, w4a4p
    (PACT activations), ..."""
    if not is_quantized(cfg):
        return "fp32"
    short = {"fp32": "32", "ternary": "t", "binary": "b"}

    def part(c: dict[str, Any]) -> str:
        kind = c.get("kind", "fp32")
        if kind in ("dorefa", "pact"):
            return f"{c.get('bits')}{'p' if kind == 'pact' else ''}"
        return short[kind]

    return f"w{part(dict(cfg.get('weight') or {}))}a{part(dict(cfg.get('act') or {}))}"


def bit_widths(model: nn.Module) -> tuple[int, int]:
    """(weight bits, activation bits) of the quantized part of the model (32 when float)."""
    w = [m.weight_bits for m in model.modules() if isinstance(m, QConv2d | QLinear)]
    a = [getattr(m.fn, "bits", 32) for m in model.modules() if isinstance(m, Activation)]
    return (min(w) if w else 32), (min(a) if a else 32)


class ClipLatentWeights(Callback):
    """BNN's weight clipping: keep the latent weights of binary layers with clip=true in
    [-1, 1] after every optimizer step, so their sign stays responsive to updates."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [
            m.weight
            for m in model.modules()
            if isinstance(getattr(m, "weight_quant", None), BinaryWeight) and m.weight_quant.clip
        ]

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p in self.params:
                p.clamp_(-1, 1)


def quant_callbacks(model: nn.Module) -> list[Callback]:
    clip = ClipLatentWeights(model)
    return [clip] if clip.params else []
