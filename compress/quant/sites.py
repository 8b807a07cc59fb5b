"""Which quantized layers read k-bit inputs, and quantizers for the ones that read float.

An integer kernel needs its input on a quantizer's grid. Quantizers at ReLU sites (the default,
quant.act.sites=relu) give that only where a ReLU feeds the layer; in a modern network many
layers read something else: a BN output, a Hardswish / SiLU / GELU, a squeeze-excitation
product, a residual sum, an average pool. This module follows each quantized layer's input back
through the ops that keep values on a grid (max pooling, reshapes, dropout, ...) on the FX trace,
reports which inputs are float and why (`input_coverage`), and, for quant.act.sites=inputs, puts
one quantizer on each such tensor, shared by every quantized layer that reads it
(`add_input_quantizers_`): unsigned where what produces the tensor cannot be negative (ReLU-like
functions, sigmoid gates, pools of those), signed otherwise. DoReFa and PACT only have an
unsigned form ([0, clip]), so their signed inputs get LSQ's signed quantizer at the same bits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compress.models.blocks import Activation
from compress.quant.base import Quantizer
from compress.quant.int8 import Int8Act
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import BinaryAct, LSQAct, TernaryAct, act_quantizer

# ops whose output holds only values of their input (a tensor on a grid stays on it)
KEEP_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.ChannelShuffle,
)
KEEP_FUNCTIONS: set[Any] = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    torch.chunk,
    torch.split,
    F.max_pool2d,
    F.adaptive_max_pool2d,
    F.dropout,
    operator.getitem,
}
KEEP_METHODS = {
    "view",
    "reshape",
    "flatten",
    "contiguous",
    "permute",
    "transpose",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
}
# what cannot be negative: ReLU-like functions and gates
NONNEG_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Softmax,
)
NONNEG_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    torch.sigmoid,
    F.sigmoid,
    F.hardsigmoid,
    F.softmax,
    torch.softmax,
}
NONNEG_METHODS = {"relu", "sigmoid", "softmax"}
# ops whose output is >= 0 when every tensor input is (means, sums, products, joins)
MONOTONE_MODULES: tuple[type[nn.Module], ...] = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
MONOTONE_FUNCTIONS: set[Any] = {
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    torch.mean,
    torch.cat,
    operator.add,
    operator.mul,
    torch.add,
    torch.mul,
}
MONOTONE_METHODS = {"mean", "add", "mul"}
_QUANTIZED = (QConv2d, QLinear)


class _Tracer(fx.Tracer):
    """Quantized layers, quantizers and Activation slots are leaves: their insides do not
    matter here (and custom autograd Functions do not trace)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = isinstance(m, QConv2d | QLinear | Quantizer | Activation)
        return leaf or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> tuple[fx.Graph | None, str]:
    """The FX graph of `model`, or None and the first line of why it cannot be traced."""
    try:
        return _Tracer().trace(model), ""
    except Exception as e:  # any tracing failure: the caller reports it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, first


def _quantizer(m: nn.Module) -> Quantizer | None:
    """The (non-fp32) quantizer a leaf module applies to its output, if any."""
    q = m.fn if isinstance(m, Activation) else m
    if isinstance(q, Quantizer) and q.kind != "fp32":
        return q
    return None


def _unsigned(q: Quantizer) -> bool:
    if isinstance(q, BinaryAct | TernaryAct):
        return False
    if isinstance(q, LSQAct):
        return not q.signed
    if isinstance(q, Int8Act):
        return q.relu or getattr(q, "float_type", None) is nn.ReLU6
    return True  # DoReFa, PACT: [0, clip]


@dataclass
class _Graph:
    """The traced graph with the questions asked of its tensors."""

    graph: fx.Graph
    mods: dict[str, nn.Module]
    _grid: dict[fx.Node, Any] = field(default_factory=dict)

    def _keeps(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.mods[node.target], KEEP_MODULES)
        if node.op == "call_function":
            return node.target in KEEP_FUNCTIONS
        return node.op == "call_method" and node.target in KEEP_METHODS

    def grid(self, node: Any) -> Quantizer | None:
        """The quantizer whose grid the tensor `node` is on, or None (float)."""
        if not isinstance(node, fx.Node):
            return None
        if node not in self._grid:
            self._grid[node] = self._find_grid(node)
        return self._grid[node]

    def _find_grid(self, node: fx.Node) -> Quantizer | None:
        if node.op == "call_module":
            q = _quantizer(self.mods[node.target])
            if q is not None:
                return q
        if self._keeps(node):
            return self.grid(node.args[0])
        if node.op == "call_function" and node.target is torch.cat:
            grids = {id(self.grid(t)): self.grid(t) for t in node.args[0]}
            one = next(iter(grids.values())) if len(grids) == 1 else None
            return one
        return None

    def root(self, node: Any) -> Any:
        """The first node behind `node` that is not a value-keeping op."""
        while isinstance(node, fx.Node) and self._keeps(node):
            node = node.args[0]
        return node

    def why(self, node: Any) -> str:
        """What makes the tensor `node` float, in a few words."""
        node = self.root(node)
        if not isinstance(node, fx.Node) or node.op == "placeholder":
            return "the model input"
        if node.op == "call_module":
            m = self.mods[node.target]
            if isinstance(m, _QUANTIZED):
                return f"the output of {node.target} (a quantized layer, no activation between)"
            return f"a {type(m).__name__} output ({node.target})"
        t = node.target
        if t in (operator.add, torch.add, "add", operator.iadd):
            return "a sum (a residual stream)"
        if t in (operator.mul, torch.mul, "mul"):
            return "a product (a gate or a scale)"
        if t is torch.cat:
            return "a concatenation of tensors on different grids"
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        return f"a {name} output"

    def nonneg(self, node: Any, depth: int = 0) -> bool:
        """Whether the tensor `node` cannot be negative (a conservative answer: False)."""
        if isinstance(node, int | float):
            return node >= 0
        if not isinstance(node, fx.Node) or depth > 64:
            return False
        if node.op == "call_module":
            m = self.mods[node.target]
            q = _quantizer(m)
            if q is not None:
                return _unsigned(q)
            if isinstance(m, (Activation, *NONNEG_MODULES)):
                return True  # an Activation slot left float holds a ReLU
            if isinstance(m, KEEP_MODULES + MONOTONE_MODULES):
                return self.nonneg(node.args[0], depth + 1)
            return False
        t = node.target
        if (node.op == "call_function" and t in NONNEG_FUNCTIONS) or (
            node.op == "call_method" and t in NONNEG_METHODS
        ):
            return True
        if self._keeps(node):
            return self.nonneg(node.args[0], depth + 1)
        monotone = (node.op == "call_function" and t in MONOTONE_FUNCTIONS) or (
            node.op == "call_method" and t in MONOTONE_METHODS
        )
        if monotone:
            args = node.args[0] if t is torch.cat else node.args
            values = [a for a in args if isinstance(a, fx.Node | int | float)]
            return all(self.nonneg(a, depth + 1) for a in values)
        return False


def _readers(g: _Graph) -> tuple[dict[str, list[fx.Node]], dict[str, str]]:
    """Each quantized layer's call nodes; the layers called on several tensors, not all of
    them on a grid (a head shared by an FPN's levels), with why: no one tensor can be given
    their quantizer, so such a layer gets its own (`add_input_quantizers_`)."""
    calls: dict[str, list[fx.Node]] = {}
    for node in g.graph.nodes:
        if node.op == "call_module" and isinstance(g.mods[node.target], _QUANTIZED):
            calls.setdefault(node.target, []).append(node)
    shared: dict[str, str] = {}
    for name, nodes in calls.items():
        inputs = list(dict.fromkeys(n.args[0] for n in nodes))
        floats = [x for x in inputs if g.grid(x) is None]
        if len(inputs) > 1 and floats:
            shared[name] = (
                f"called at {len(inputs)} places on different inputs, {len(floats)} of them "
                f"float ({g.why(floats[0])})"
            )
    return calls, shared


def input_coverage(model: nn.Module) -> dict[str, str | None] | None:
    """For every quantized conv / linear layer: None if it reads a k-bit input (a quantizer's
    grid, or its own input quantizer), else why its input is float. None when the model cannot
    be traced (nothing can be said)."""
    graph, _ = trace(model)
    if graph is None:
        return None
    g = _Graph(graph, dict(model.named_modules()))
    calls, shared = _readers(g)
    out: dict[str, str | None] = {}
    for name, nodes in calls.items():
        layer = g.mods[name]
        if layer._modules.get("input_quant") is not None:
            out[name] = None
        elif name in shared:
            out[name] = shared[name]
        else:
            x = nodes[0].args[0]
            out[name] = None if g.grid(x) is not None else g.why(x)
    return out


def input_quantizer(acfg: dict[str, Any], signed: bool) -> Quantizer:
    """The quantizer for a layer input of this sign under `quant.act` (see the module doc)."""
    kind, bits = acfg.get("kind"), acfg.get("bits")
    if kind == "lsq":
        return LSQAct(int(bits), signed=signed)
    if kind == "int8":
        return Int8Act(relu=False)
    if kind in ("dorefa", "pact") and signed:
        return LSQAct(int(bits), signed=True)
    return act_quantizer({k: v for k, v in acfg.items() if k != "signed"})


def add_input_quantizers_(model: nn.Module, acfg: dict[str, Any]) -> None:
    """Give every quantized layer that reads a float tensor an input quantizer (one per tensor,
    shared by its quantized readers; `layer.input_quant`). A layer called on several tensors
    (a head shared by an FPN's levels) gets its own, one scale over all its calls. Raises
    ValueError when the model cannot be traced."""
    graph, reason = trace(model)
    if graph is None:
        raise ValueError(reason)
    g = _Graph(graph, dict(model.named_modules()))
    calls, shared = _readers(g)
    per_tensor: dict[fx.Node, list[str]] = {}
    for name, nodes in calls.items():
        if g.mods[name]._modules.get("input_quant") is not None:
            continue
        if name in shared:
            signed = not all(g.nonneg(n.args[0]) for n in nodes)
            g.mods[name].input_quant = input_quantizer(acfg, signed=signed)
            continue
        x = nodes[0].args[0]
        if g.grid(x) is None:
            per_tensor.setdefault(x, []).append(name)
    for x, names in per_tensor.items():
        q = input_quantizer(acfg, signed=not g.nonneg(x))
        for name in names:
            g.mods[name].input_quant = q
