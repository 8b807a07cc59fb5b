"""quantize_(model, cfg, filter_fn): turn any float nn.Module into a quantization-aware one.

cfg (the `quant` config group, as a dict):
  weight: {kind: fp32|dorefa|ternary|binary|int8|lsq, bits, gap, scale, center, clip}
  act:    {kind: fp32|dorefa|pact|ternary|binary|int8|lsq, bits, threshold, grad, clip_init,
           signed}
  keep_first_last: keep the first conv / linear layer (in execution order) and the last ones
                   (those whose outputs reach the model's output: a classifier's last linear,
                   each prediction conv of a detector's heads) float
  keep: names of further conv / linear layers to keep full precision

Weights go through a handler table keyed by exact type (torchao's shape): a Conv2d subclass
with its own forward is left alone unless its type is registered with `register_weight_handler`.

Activations: a model built from this project's `Activation` slots gets the quantizer in every
slot (its plain nn.ReLUs mark activations that must stay float, e.g. on the logits). Any other
model gets it in place of every ReLU / ReLU6 module: the ReLU call sites. We quantize there
rather than at the input of every quantized layer because DoReFa and PACT quantize to [0, a]:
a layer input that can be negative (a MobileNet bottleneck, a pre-activation residual stream)
would be clipped to zero, while a ReLU's output is non-negative by construction and the
quantizer's clip subsumes the ReLU, exactly as in the project's own models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from compress.config import validate_quant
from compress.detection.models import core_of
from compress.errors import ConfigError
from compress.models.blocks import Activation
from compress.quant.int8 import Int8Act
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import (
    BinaryAct,
    BinaryWeight,
    DoReFaAct,
    FP32Act,
    LSQAct,
    PACTAct,
    Quantizer,
    TernaryAct,
    act_quantizer,
    weight_quantizer,
)
from compress.quant.sites import add_input_quantizers_, input_coverage

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]

# exact type -> builder of the quantized module from the float one and a weight quantizer
WEIGHT_HANDLERS: dict[type[nn.Module], Callable[[Any, Quantizer], nn.Module]] = {
    nn.Conv2d: QConv2d.from_float,
    nn.Linear: QLinear.from_float,
}
# module types whose output an activation quantizer replaces in a model without Activation slots
ACT_SITES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
ACT_QUANTIZERS = (FP32Act, DoReFaAct, PACTAct, TernaryAct, BinaryAct, Int8Act, LSQAct)


def register_weight_handler(cls: type[nn.Module], handler: Callable[..., nn.Module]) -> None:
    """Quantize the weights of modules of exact type `cls` with `handler(module, quantizer)`."""
    WEIGHT_HANDLERS[cls] = handler


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv / linear layers (float or already quantized), in registration order."""
    quantized = (QConv2d, QLinear)
    return [
        (n, m)
        for n, m in model.named_modules()
        if type(m) in WEIGHT_HANDLERS or isinstance(m, quantized)
    ]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class _OrderTracer(fx.Tracer):
    """Records the order in which leaf modules run; nothing else of the graph is needed."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QConv2d | QLinear | Activation) or super().is_leaf_module(m, qualname)


def _order_graph(model: nn.Module) -> fx.Graph | None:
    """The FX graph of `model` with its layers as leaves; None, with a notice, when it cannot
    be traced."""
    try:
        return _OrderTracer().trace(model)
    except Exception as e:  # any tracing failure: fall back, the order is only a default
        log.warning(
            "quant: cannot trace %s (%s); first / last layers taken in registration order",
            type(model).__name__,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return None


def execution_order(model: nn.Module, names: list[str], graph: fx.Graph | None = None) -> list[str]:
    """`names` sorted by when forward first calls them (FX trace); registration order for a
    model that cannot be traced."""
    graph = _order_graph(model) if graph is None else graph
    if graph is None:
        return names
    seen: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module" and node.target in names and node.target not in seen:
            seen.append(node.target)
    return seen + [n for n in names if n not in seen]  # layers forward never calls: last


def output_layers(graph: fx.Graph, names: list[str]) -> list[str]:
    """The layers of `names` whose outputs reach the model's output with no other one of them
    in between, in execution order: a classifier's last linear; each prediction conv of a
    detector core's heads (class scores and box offsets per feature map)."""
    wanted, found, seen = set(names), set(), set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and node.target in wanted:
            found.add(node.target)
            continue
        stack += node.all_input_nodes
    order = [n.target for n in graph.nodes if n.op == "call_module" and n.target in found]
    return list(dict.fromkeys(order))


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
        graph = _order_graph(model)
        ordered = execution_order(model, names, graph)
        last = output_layers(graph, names) if graph is not None else []
        keep += [ordered[0], *(last or ordered[-1:])]
    return sorted(set(keep), key=names.index)


def validate(cfg: dict[str, Any]) -> None:
    """Check a quant config without building anything (start-up validation)."""
    validate_quant(cfg)


def is_quantized(cfg: dict[str, Any] | None) -> bool:
    if not cfg:
        return False
    return (cfg.get("weight") or {}).get("kind", "fp32") != "fp32" or (cfg.get("act") or {}).get(
        "kind", "fp32"
    ) != "fp32"


def activation_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Where activation quantizers go: the model's Activation slots if it has any, else its
    ReLU / ReLU6 modules (exact types)."""
    slots = [(n, m) for n, m in model.named_modules() if isinstance(m, Activation)]
    if slots:
        return slots
    return [(n, m) for n, m in model.named_modules() if type(m) in ACT_SITES]


def quantize_(
    model: nn.Module, cfg: dict[str, Any], filter_fn: FilterFn | None = None
) -> nn.Module:
    """Swap layers and activations for their quantized versions as `cfg` says (in place).

    `filter_fn(module, name)`: only conv / linear layers for which it returns True get
    quantized weights (after `keep` / `keep_first_last`). `model.quant_config` afterwards holds
    what was really applied: a part that matched nothing is refused, never silently reported.
    """
    validate(cfg)
    wcfg, acfg = dict(cfg.get("weight") or {}), dict(cfg.get("act") or {})
    name = getattr(model, "arch", {}).get("name", type(model).__name__)
    whole, model = model, core_of(model)  # a detector's core: anchors, decoding, NMS stay float
    at_inputs = acfg.get("kind", "fp32") != "fp32" and acfg.get("sites", "relu") == "inputs"
    # input quantizers live on quantized layers: with float weights those are fp32-weight ones
    if wcfg.get("kind", "fp32") != "fp32" or at_inputs:
        keep = set(kept_layers(model, cfg))
        swapped = 0
        for lname, m in _layers(model):
            if lname in keep or isinstance(m, QConv2d | QLinear):
                continue
            if filter_fn is not None and not filter_fn(m, lname):
                continue
            _set(model, lname, WEIGHT_HANDLERS[type(m)](m, weight_quantizer(wcfg)))
            swapped += 1
        if swapped == 0:
            raise ConfigError(
                f"quant.weight.kind={wcfg['kind']}: no layer of {name} was quantized (every "
                "conv / linear layer is kept, filtered out, or of an unregistered type); set "
                "quant.keep_first_last=false or register the layer type"
            )
    if acfg.get("kind", "fp32") != "fp32":
        sites = activation_sites(model)
        if not sites and not at_inputs:
            raise ConfigError(
                f"quant.act.kind={acfg['kind']}: {name} has no activation to quantize (no "
                "Activation slot, nn.ReLU or nn.ReLU6 module; F.relu calls inside forward are "
                "not seen): use quant.act.sites=inputs, nn.ReLU modules, or quant.act.kind=fp32"
            )
        for sname, m in sites:
            if isinstance(m, Activation):
                m.fn = act_quantizer(acfg)
            else:
                q = act_quantizer(acfg)
                q.float_type = type(m)  # what to_float puts back
                _set(model, sname, q)
        if at_inputs:
            try:
                add_input_quantizers_(model, acfg)
            except ValueError as e:
                raise ConfigError(
                    f"quant.act.sites=inputs: torch.fx cannot trace {name} ({e}), so the inputs "
                    "of its layers cannot be found; use quant.act.sites=relu"
                ) from None
    whole.quant_config = dict(cfg)
    return whole


def input_report(model: nn.Module) -> dict[str, Any] | None:
    """How many quantized layers read k-bit inputs and which read float, with why (None: the
    model cannot be traced, or has no quantized layer)."""
    coverage = input_coverage(core_of(model))
    if not coverage:
        return None
    floats = {name: why for name, why in coverage.items() if why is not None}
    return {"kbit_inputs": len(coverage) - len(floats), "float_inputs": floats}


def to_float(model: nn.Module) -> nn.Module:
    """Undo `quantize_`: float layers (same parameters) and ReLU activations (in place)."""
    for name, m in _layers(model):
        if isinstance(m, QConv2d | QLinear):
            _set(model, name, m.to_float())
    for name, m in list(model.named_modules()):
        if isinstance(m, Activation):
            m.fn = nn.ReLU()
        elif isinstance(m, ACT_QUANTIZERS):
            _set(model, name, getattr(m, "float_type", nn.ReLU)())
    model.quant_config = None
    return model


def quant_label(cfg: dict[str, Any] | None) -> str:
    """A short name derived from the settings themselves: fp32, w4a4, wbab, wta32, w4a4p
    (PACT activations), int8_qat (INT8 weights and activations; wi8a32 with one of them),
    w4a4l (LSQ weights and activations; mixed with another kind, each part is marked: w4la4p
    LSQ weights with PACT activations, w4da4l DoReFa weights with LSQ activations, so that no
    two settings share a name), ..."""
    if not is_quantized(cfg):
        return "fp32"
    w, a = dict(cfg.get("weight") or {}), dict(cfg.get("act") or {})
    if w.get("kind") == a.get("kind") == "int8":
        return "int8_qat"
    if w.get("kind") == a.get("kind") == "lsq":
        return f"w{w.get('bits')}a{a.get('bits')}l"
    short = {"fp32": "32", "ternary": "t", "binary": "b", "int8": "i8"}
    mixed_lsq = "lsq" in (w.get("kind"), a.get("kind"))

    def part(c: dict[str, Any]) -> str:
        kind = c.get("kind", "fp32")
        if kind == "dorefa":
            return f"{c.get('bits')}{'d' if mixed_lsq else ''}"
        if kind in ("pact", "lsq"):
            return f"{c.get('bits')}{kind[0]}"
        return short[kind]

    return f"w{part(w)}a{part(a)}"


def act_quantizers(model: nn.Module) -> list[Quantizer]:
    """The activation quantizers installed in a model (in slots or at ReLU call sites)."""
    out = []
    for m in model.modules():
        if isinstance(m, Activation) and isinstance(m.fn, Quantizer):
            out.append(m.fn)
        elif isinstance(m, ACT_QUANTIZERS):
            out.append(m)
    return out


def bit_widths(model: nn.Module) -> tuple[int, int]:
    """(weight bits, activation bits) of the quantized part of the model (32 when float)."""
    w = [m.weight_bits for m in model.modules() if isinstance(m, QConv2d | QLinear)]
    a = [q.bits for q in act_quantizers(model)]
    return (min(w) if w else 32), (min(a) if a else 32)


def applied_label(model: nn.Module) -> str:
    """The run name of what `model` really computes: `quant_label` of the kinds installed."""
    cfg = getattr(model, "quant_config", None)
    if not cfg:
        return "fp32"
    has_w = any(isinstance(m, QConv2d | QLinear) for m in model.modules())
    has_a = any(q.kind != "fp32" for q in act_quantizers(model))
    applied = {
        "weight": cfg.get("weight") if has_w else {"kind": "fp32"},
        "act": cfg.get("act") if has_a else {"kind": "fp32"},
    }
    return quant_label(applied)


def latent_clip_params(model: nn.Module) -> list[nn.Parameter]:
    """Latent weights of binary layers with clip=true (BNN's weight clipping)."""
    return [
        m.weight
        for m in model.modules()
        if isinstance(getattr(m, "weight_quant", None), BinaryWeight) and m.weight_quant.clip
    ]


def clip_latent_weights_(params: list[nn.Parameter]) -> None:
    """Keep latent binary weights in [-1, 1] (call after each optimizer step), so their sign
    stays responsive to updates."""
    with torch.no_grad():
        for p in params:
            p.clamp_(-1, 1)
