"""A channel-dependency graph of any traceable model, built from an FX trace and shapes.

Every output channel of a conv / linear layer is an *atom*. Atoms flow through the traced
graph as lists (one atom per channel, or per feature after a flatten); an op that mixes two
lists channel by channel (a residual add, an SE multiply, a depthwise conv) unites their atoms,
a concatenation joins lists, a channel shuffle permutes one. Atoms united end up in one *class*:
channels that must be pruned together. Classes whose atoms come from the same layers form a
*group*, ranked and thinned as one unit.

Anything the graph does not understand freezes the channels it touches (never pruned), so an
unknown op can cost pruning opportunities but never produce a wrong model. That is where this
graph differs from Torch-Pruning, which assumes an unknown op keeps channels in place (wrong
for this project's channel shuffle and option-A shortcut, see docs/pruning.md).
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision.ops
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from compress.detection.models import core_of
from compress.errors import CompressError
from compress.models.blocks import Activation, ChannelShuffle
from compress.prune.group import Group, Importance  # noqa: F401  (Importance re-exported)
from compress.prune.importance import bn_scale_importance  # noqa: F401  (re-exported)
from compress.quant.quantizers import Quantizer


class PruneError(CompressError):
    """The model or checkpoint cannot be pruned as asked."""


# Modules that act on each channel alone: channels pass through unchanged.
CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (
    Activation,
    Quantizer,  # an activation quantizer at a ReLU call site (one clip for all channels)
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.AlphaDropout,
    nn.Dropout1d,
    torchvision.ops.StochasticDepth,
)
CHANNELWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.hardtanh,
    F.hardswish,
    F.silu,
    F.gelu,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    torchvision.ops.stochastic_depth,  # one keep / drop per sample (or batch): all channels
}


# channel-wise, but over the spatial dims: not on a channels-last (N, H, W, C) tensor
_SPATIAL = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.Dropout2d,
)
_SPATIAL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}


CHANNELWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "clamp",
    "clamp_",
    "contiguous",
    "clone",
    "float",
    "to",
    "detach",
}
MIXING_OPS: set[Any] = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
}
MIXING_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
FLATTENS: set[Any] = {torch.flatten}
BNS = (nn.BatchNorm2d, nn.BatchNorm1d)


def register_channelwise(op: type[nn.Module] | Callable[..., Any]) -> None:
    """Declare a module type or a function that acts on each channel alone (its output has its
    input's channels, each computed from that channel only: an activation, a per-sample drop
    such as stochastic depth, a pooling), so that the channel graph follows channels through
    it instead of freezing those it reads, as it does for ops it does not know. A function must
    be one torch.fx records as a call rather than tracing through it (`torch.fx.wrap`, as
    torchvision's stochastic_depth is)."""
    global CHANNELWISE_MODULES
    if isinstance(op, type) and issubclass(op, nn.Module):
        if not issubclass(op, CHANNELWISE_MODULES):
            CHANNELWISE_MODULES = (*CHANNELWISE_MODULES, op)
    elif callable(op) and not isinstance(op, type):
        CHANNELWISE_FUNCTIONS.add(op)
    else:
        raise TypeError(
            f"register_channelwise takes an nn.Module subclass or a function, not {op!r}"
        )


# ---------------------------------------------------------------- tracing
class _Tracer(fx.Tracer):
    """Leaves: layers with parameters the graph edits, the channel-wise modules, and any type
    the caller names. Remembers the module being traced when tracing fails."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, ChannelShuffle, *BNS, *self.leaves)):
            return True
        if isinstance(m, CHANNELWISE_MODULES):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[no-untyped-def]
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(
    model: nn.Module, example: torch.Tensor, leaves: Sequence[type[nn.Module]] = ()
) -> fx.GraphModule:
    """FX graph of `model` with every node's output shape in `node.meta["tensor_meta"]`."""
    tracer = _Tracer(tuple(leaves))
    name = getattr(model, "arch", {}).get("name", type(model).__name__)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = f"module '{tracer.failed_in}'" if tracer.failed_in else "its forward"
        kind = ""
        if tracer.failed_in:
            kind = f" ({type(model.get_submodule(tracer.failed_in)).__name__})"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PruneError(
            f"cannot trace {name}: {where}{kind} has data-dependent control flow or an "
            f"untraceable call ({first}); mark its type a leaf (channel_graph(..., leaves=[Type]), "
            "its channels are then kept) or prune this model with a per-model handler"
        ) from None
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    model.train(was_training)
    return gm


# ---------------------------------------------------------------- union-find over atoms
class _Atoms:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: list[bool] = []
        self.why: list[str | None] = []  # of a frozen root: the first reason it was frozen

    def new(self, n: int, frozen: bool = False, why: str | None = None) -> list[int]:
        start = len(self.parent)
        self.parent += range(start, start + n)
        self.frozen += [frozen] * n
        self.why += [why if frozen else None] * n
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if not self.frozen[ra] and self.frozen[rb]:
                self.why[ra] = self.why[rb]
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]

    def freeze(self, atoms: Iterable[int], why: str) -> None:
        for a in atoms:
            r = self.find(a)
            if not self.frozen[r]:
                self.frozen[r], self.why[r] = True, why

    def is_frozen(self, a: int) -> bool:
        return self.frozen[self.find(a)]


@dataclass
class Chunks:
    """A constraint: `atoms` split into `parts` equal contiguous chunks that must stay equal
    (the groups of a grouped conv, on its input or output; the input of a channel shuffle)."""

    atoms: list[int]
    parts: int


@dataclass
class Layer:
    """How one module reads channels: the atom list of its input (its output atoms, when it
    produces channels, are the walker's `spaces[name]`)."""

    name: str
    module: nn.Module
    inputs: list[int] | None = None  # conv / linear / BN input atoms (one per channel/feature)


def _op_name(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    """An op in a few characters, for a reason: 'LayerNorm features.1', 'cumsum', '.mean()'."""
    t = node.target
    if node.op == "call_module":
        return f"{type(mods[t]).__name__} {t}"
    if node.op == "call_method":
        return f".{t}()"
    return getattr(t, "__name__", str(t))


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _shuffle(lst: list[int], groups: int) -> list[int]:
    """The atom list after ChannelShuffle(groups): channel c goes to (c % per) * g + c // per."""
    per = len(lst) // groups
    out = [0] * len(lst)
    for c, a in enumerate(lst):
        out[(c % per) * groups + c // per] = a
    return out


class _Walker:
    """One pass over the graph computing each node's atom list.

    `outputs` maps a producing layer to the atom list it emits; left None, fresh atoms are made
    and all the coupling facts (unions, freezes, constraints, layer inputs) are recorded.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        atoms: _Atoms,
        produced: dict[str, list[int]] | None = None,
        constants: dict[str, list[int]] | None = None,
    ) -> None:
        self.gm, self.atoms, self.produced = gm, atoms, produced
        self.record = produced is None
        # the first pass's lists: shape checks compare with the unpruned widths
        self.ref: dict[fx.Node, list[int] | None] = {}
        self.constants: dict[str, list[int]] = constants if constants is not None else {}
        self.mods = dict(gm.named_modules())
        self.lists: dict[fx.Node, list[int] | None] = {}
        self.layers: dict[str, Layer] = {}
        self.chunks: list[Chunks] = []
        self.spaces: dict[str, list[int]] = {}  # producing layer -> its output atoms
        self.depthwise: set[str] = set()
        # tensors whose channels are their last dim (after a permute to NHWC: ConvNeXt's blocks)
        self.last: set[fx.Node] = set()

    # -- helpers
    def _rlen(self, a: fx.Node) -> int:
        """Length of `a`'s list before pruning."""
        ref = self.ref if self.ref else self.lists
        return len(ref[a] or [])

    def _arg(self, a: Any) -> list[int] | None:
        return self.lists.get(a) if isinstance(a, fx.Node) else None

    def _tensor_args(self, node: fx.Node, lengths: bool = False) -> list[Any]:
        out: list[Any] = []

        def visit(x: Any) -> Any:
            lst = self._arg(x)
            if lst is not None:
                out.append((lst, self._rlen(x)) if lengths else lst)
            return x

        fx.node.map_arg((node.args, node.kwargs), visit)
        return out

    def _opaque(self, node: fx.Node, why: str | None = None) -> list[int] | None:
        """An op this graph does not know: its inputs' channels are frozen, its output is new."""
        what = f"an op the channel graph does not follow ({_op_name(node, self.mods)})"
        if self.record:
            for lst in self._tensor_args(node):
                self.atoms.freeze(lst, why or f"read by {what}")
        return self._constant(node, why or f"the output of {what}")

    def _constant(self, node: fx.Node, why: str | None = None) -> list[int] | None:
        """Frozen channels that come from outside the graph's layers (the input, a tensor
        attribute, an unknown op): the same atoms in both passes."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        if self.record:
            why = why or "the model input or a constant tensor"
            self.constants[node.name] = self.atoms.new(shape[1], frozen=True, why=why)
        return list(self.constants[node.name])

    def _fresh(self, name: str, n: int) -> list[int]:
        if self.record:
            lst = self.atoms.new(n)
            self.spaces[name] = lst
            return lst
        return list(self.produced[name])  # type: ignore[index]

    def _mix(self, node: fx.Node) -> list[int] | None:
        pairs = self._tensor_args(node, lengths=True)
        shape = _shape(node)
        if not pairs:
            return None
        width = shape[1] if shape is not None and len(shape) >= 2 else None
        full = [lst for lst, n in pairs if n == width]
        broadcast = [n for _, n in pairs if n != width]
        if not full or any(n != 1 for n in broadcast):
            return self._opaque(node)
        if self.record:
            for other in full[1:]:
                for a, b in zip(full[0], other, strict=True):
                    self.atoms.union(a, b)
            if shape is not None and self._per_channel_operand(node, len(shape), width):
                why = "scaled by a per-channel tensor (a layer scale) the graph does not resize"
                self.atoms.freeze(full[0], why)
        return list(full[0])

    def _per_channel_operand(self, node: fx.Node, rank: int, width: int | None) -> bool:
        """Whether an operand of lower rank broadcasts along the channel dim with one value per
        channel, like a (C, 1, 1) layer scale (its dim 0 lines up with the output's dim 1)."""
        for a in (*node.args, *node.kwargs.values()):
            shape = _shape(a) if isinstance(a, fx.Node) else None
            if shape is None or not 0 < len(shape) < rank:
                continue
            at = len(shape) - (rank - 1)
            if 0 <= at < len(shape) and shape[at] == width != 1:
                return True
        return False

    # -- node kinds
    def module(self, node: fx.Node) -> list[int] | None:
        m, name = self.mods[node.target], str(node.target)
        x = self._arg(node.args[0]) if node.args else None
        if x is None or name in self.shared:  # a layer called twice: one width for both calls
            why = "a layer called more than once" if name in self.shared else None
            return self._opaque(node, why)
        if isinstance(m, nn.Conv2d):
            return self._conv(name, m, x)
        if isinstance(m, nn.Linear):
            shape = _shape(node.args[0])
            if shape is None or len(shape) != 2:
                return self._opaque(node)
            self.layers[name] = Layer(name, m, inputs=x)
            return self._fresh(name, m.out_features)
        if isinstance(m, BNS):
            self.layers[name] = Layer(name, m, inputs=x)
            return x
        if isinstance(m, ChannelShuffle):
            if self.record:
                self.chunks.append(Chunks(list(x), m.groups))
            return _shuffle(x, m.groups)
        if isinstance(m, CHANNELWISE_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            return self._flatten(node, x)
        return self._opaque(node)

    def _conv(self, name: str, m: nn.Conv2d, x: list[int]) -> list[int]:
        g = m.groups
        if g > 1 and g == m.in_channels == m.out_channels:  # depthwise: channel i -> channel i
            self.depthwise.add(name)
            self.layers[name] = Layer(name, m, inputs=x)
            return x
        if g > 1 and m.in_channels == g:  # depthwise with a multiplier: kept whole
            why = "a depthwise conv with a channel multiplier (kept whole)"
            if self.record:
                self.atoms.freeze(x, why)
            self.layers[name] = Layer(name, m, inputs=x)
            out = self._fresh(name, m.out_channels)
            if self.record:
                self.atoms.freeze(out, why)
            return out
        self.layers[name] = Layer(name, m, inputs=x)
        out = self._fresh(name, m.out_channels)
        if self.record and g > 1:
            self.chunks += [Chunks(list(x), g), Chunks(list(out), g)]
        return out

    def _flatten(self, node: fx.Node, x: list[int]) -> list[int] | None:
        src, dst = _shape(node.args[0]), _shape(node)
        if src is None or dst is None or len(dst) != 2 or len(src) < 2:
            return self._opaque(node)
        per = 1
        for d in src[2:]:
            per *= d
        if dst[1] != src[1] * per or self._rlen(node.args[0]) != src[1]:
            return self._opaque(node)
        return [a for a in x for _ in range(per)]

    def function(self, node: fx.Node) -> list[int] | None:
        t = node.target
        if node.op == "call_method":
            if t in CHANNELWISE_METHODS:
                return self._arg(node.args[0])
            if t in MIXING_METHODS:
                return self._mix(node)
            if t in ("size", "dim"):
                return None
            if t in ("flatten", "view", "reshape"):
                x = self._arg(node.args[0])
                return self._flatten(node, x) if x is not None else None
            if t == "mean":
                return self._mean(node)
            return self._opaque(node) if self._tensor_args(node) else None
        if t in CHANNELWISE_FUNCTIONS:
            return self._arg(node.args[0])
        if t in MIXING_OPS:
            return self._mix(node)
        if t in FLATTENS or t is torch.reshape:
            x = self._arg(node.args[0])
            return self._flatten(node, x) if x is not None else None
        if t is torch.cat:
            return self._cat(node)
        if t is operator.getitem:
            return self._getitem(node)
        if t is torch.mean:
            return self._mean(node)
        if not self._tensor_args(node):
            return None
        return self._opaque(node)

    def _mean(self, node: fx.Node) -> list[int] | None:
        x = self._arg(node.args[0])
        src, dst = _shape(node.args[0]), _shape(node)
        if (
            x is not None
            and src
            and dst
            and len(dst) >= 2
            and dst[1] == src[1] == self._rlen(node.args[0])
        ):
            return x  # a mean over spatial dims keeps the channels
        return self._opaque(node)

    def _cat(self, node: fx.Node) -> list[int] | None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        lists = [self._arg(t) for t in tensors]
        shape = _shape(node)
        if dim in (1, -3) and shape is not None and len(shape) == 4 and all(lists):
            return [a for lst in lists for a in lst]  # type: ignore[union-attr]
        return self._opaque(node)

    def _getitem(self, node: fx.Node) -> list[int] | None:
        x = self._arg(node.args[0])
        if x is None:
            return None
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None, None, None)
        if len(idx) >= 2 and idx[0] == full and idx[1] == full and Ellipsis not in idx:
            return x  # spatial slicing only
        return self._opaque(node)

    # -- channels last (N, H, W, C): the few ops that keep them there
    def _permute_dims(self, node: fx.Node) -> tuple[int, ...] | None:
        dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        if node.op == "call_function" and not dims:
            dims = tuple(node.kwargs.get("dims", ()))
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None

    def _is_permute(self, node: fx.Node) -> bool:
        return (node.op == "call_method" and node.target == "permute") or (
            node.op == "call_function" and node.target is torch.permute
        )

    def _to_last(self, node: fx.Node) -> list[int] | None:
        """x.permute(0, 2, 3, 1) of an NCHW tensor: the same channels, now the last dim."""
        x = self._arg(node.args[0])
        shape = _shape(node.args[0])
        if x is None or shape is None or len(shape) != 4 or self._rlen(node.args[0]) != shape[1]:
            return self._opaque(node)
        self.last.add(node)
        return x

    def _channels_last(self, node: fx.Node) -> list[int] | None:
        """An op on a channels-last tensor: linears over the channels (ConvNeXt's pointwise
        MLP), element-wise functions, sums of such tensors and the permute back to NCHW keep
        following the channels; LayerNorm over them normalizes them together, so they are
        frozen (a removed channel would change every other's normalization); anything else
        is opaque."""
        src = node.args[0] if node.args else None
        x = self._arg(src)
        width = (_shape(src) or (0,))[-1] if isinstance(src, fx.Node) else 0
        if x is None or self._rlen(src) != width:  # type: ignore[arg-type]
            return self._opaque(node)
        if self._is_permute(node):
            if self._permute_dims(node) in ((0, 3, 1, 2), (0, -1, 1, 2)):
                return x
            return self._opaque(node)
        kept = None
        if node.op == "call_module":
            m, name = self.mods[node.target], str(node.target)
            if name in self.shared:
                return self._opaque(node, "a layer called more than once")
            if isinstance(m, nn.Linear):
                self.layers[name] = Layer(name, m, inputs=x)
                kept = self._fresh(name, m.out_features)
            elif isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (width,):
                if self.record:
                    self.atoms.freeze(x, "normalized together (LayerNorm over the channels)")
                kept = x
            elif isinstance(m, CHANNELWISE_MODULES) and not isinstance(m, _SPATIAL):
                kept = x
        elif node.target is F.layer_norm:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            if tuple(shape or ()) == (width,):
                if self.record:
                    self.atoms.freeze(x, "normalized together (LayerNorm over the channels)")
                kept = x
        elif node.target in CHANNELWISE_FUNCTIONS - _SPATIAL_FUNCTIONS or (
            node.op == "call_method" and node.target in CHANNELWISE_METHODS
        ):
            kept = x
        elif node.target in MIXING_OPS or (
            node.op == "call_method" and node.target in MIXING_METHODS
        ):
            kept = self._mix_last(node, width)
        if kept is None:
            return self._opaque(node)
        self.last.add(node)
        return kept

    def _mix_last(self, node: fx.Node, width: int) -> list[int] | None:
        """A sum / product of channels-last tensors of one width (or of one and a scalar)."""
        full = []
        for a in (a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)):
            lst, shape = self._arg(a), _shape(a)
            if a in self.last and lst is not None and self._rlen(a) == width:
                full.append(lst)
            elif shape is not None and math.prod(shape) != 1:
                return None  # a tensor that is not channels-last (or broadcasts per channel)
        if self.record:
            for other in full[1:]:
                for a, b in zip(full[0], other, strict=True):
                    self.atoms.union(a, b)
        return list(full[0])

    def _reads_last(self, node: fx.Node) -> bool:
        found = False

        def visit(a: Any) -> Any:
            nonlocal found
            found = found or a in self.last
            return a

        fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def run(self) -> None:
        calls: dict[str, int] = defaultdict(int)
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] += 1
        resizable = (nn.Conv2d, nn.Linear, *BNS)
        self.shared = {t for t, n in calls.items() if n > 1 and isinstance(self.mods[t], resizable)}
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.lists[node] = self._constant(node)
            elif node.op != "output" and self._reads_last(node):
                self.lists[node] = self._channels_last(node)
            elif self._is_permute(node) and self._permute_dims(node) in ((0, 2, 3, 1),):
                self.lists[node] = self._to_last(node)
            elif node.op == "call_module":
                self.lists[node] = self.module(node)
            elif node.op in ("call_function", "call_method"):
                self.lists[node] = self.function(node)
            elif node.op == "output" and self.record:
                for lst in self._tensor_args(node):
                    self.atoms.freeze(lst, "the model's output (its width is the class count)")


# ---------------------------------------------------------------- the graph
class ChannelGraph:
    """The coupled channel groups of `model` for input shape `example.shape`. `require_bn`:
    only channels a BatchNorm scales are prunable (network slimming and Taylor rank BN scales
    or outputs); without it the filter-magnitude criteria rank any channel (a BN-free model, a
    squeeze-excitation hidden layer)."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        leaves: Sequence[type[nn.Module]] = (),
        require_bn: bool = True,
    ) -> None:
        model = core_of(model)  # a detector's backbone, neck and heads; the names are its
        self.model = model
        self.require_bn = require_bn
        self.gm = trace(model, example, leaves)
        self.atoms = _Atoms()
        walker = _Walker(self.gm, self.atoms, None)
        walker.run()
        self.walker = walker
        self.image_shape = tuple(example.shape[1:])
        self.groups = self._groups()
        self._macs: list[_MacLayer] | None = None

    def frozen_channels(self) -> tuple[int, int, dict[str, int]]:
        """(frozen, total, {reason: frozen count}) over the output channels of every conv and
        linear layer: what no pruning of this graph can remove, and why."""
        why: dict[str, int] = defaultdict(int)
        total = 0
        for lst in self.walker.spaces.values():
            total += len(lst)
            for a in lst:
                r = self.atoms.find(a)
                if self.atoms.frozen[r]:
                    why[self.atoms.why[r] or "unknown"] += 1
        # layers the walk never gave channels of their own (their input reached them through
        # an op the graph does not follow): frozen too, and counted
        w, mods = self.walker, dict(self.gm.named_modules())
        called = {str(n.target) for n in self.gm.graph.nodes if n.op == "call_module"}
        for name in sorted(called - set(w.spaces) - w.depthwise):
            m = mods[name]
            if isinstance(m, nn.Conv2d | nn.Linear):
                n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                total += n
                why[
                    "a layer whose input comes through an op the channel graph does not follow"
                ] += n
        return sum(why.values()), total, dict(sorted(why.items(), key=lambda kv: -kv[1]))

    def _groups(self) -> list[Group]:
        w, atoms = self.walker, self.atoms
        # Slimming ranks channels by BN scales: a space without a BN on its channels is kept.
        scaled: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for layer in w.layers.values():
            if isinstance(layer.module, BNS) and layer.module.affine:
                for ch, a in enumerate(layer.inputs or []):
                    scaled[atoms.find(a)].append((layer.name, ch))
        for lst in w.spaces.values():
            if self.require_bn and any(atoms.find(a) not in scaled for a in lst):
                atoms.freeze(lst, "no BatchNorm scales them (slimming ranks channels by BN scales)")
        # A space with a frozen channel is kept whole; repeat until nothing changes.
        changed = True
        while changed:
            changed = False
            for lst in w.spaces.values():
                frozen = [atoms.is_frozen(a) for a in lst]
                if any(frozen) and not all(frozen):
                    first = atoms.why[atoms.find(lst[frozen.index(True)])]
                    atoms.freeze(lst, f"in a layer output with frozen channels ({first})")
                    changed = True
        # Group classes by the set of producing layers.
        owners: dict[int, list[str]] = defaultdict(list)
        order: list[int] = []
        for name, lst in w.spaces.items():
            for a in lst:
                r = atoms.find(a)
                if atoms.frozen[r]:
                    continue
                if r not in owners:
                    order.append(r)
                if name not in owners[r]:
                    owners[r].append(name)
        by_key: dict[tuple[str, ...], list[int]] = {}
        for r in order:
            by_key.setdefault(tuple(owners[r]), []).append(r)
        groups, class_group = [], {}
        for key, classes in by_key.items():
            for r in classes:
                class_group[r] = len(groups)
            groups.append(Group(len(groups), list(key), classes, []))
        # Cells: classes with the same chunk in every constraint keep equal counts.
        keys: dict[int, list[int]] = defaultdict(list)
        bad: set[int] = set()
        for ci, c in enumerate(w.chunks):
            per = len(c.atoms) // c.parts
            touched: set[int] = set()
            for pos, a in enumerate(c.atoms):
                r = atoms.find(a)
                if r in class_group:
                    keys[r] += [ci, pos // per]
                    touched.add(class_group[r])
            if len(touched) > 1:  # a grouped layer reads channels of several groups
                bad |= touched
        kept_groups = []
        for g in groups:
            if g.index in bad:
                atoms.freeze(g.classes, "a grouped conv reads channels of several groups")
                continue
            cell_of: dict[tuple[int, ...], list[int]] = {}
            for i, r in enumerate(g.classes):
                cell_of.setdefault(tuple(keys[r]), []).append(i)
            cells = [torch.tensor(v) for v in cell_of.values()]
            if len({len(c) for c in cells}) != 1:  # uneven groups cannot be pruned evenly
                atoms.freeze(g.classes, "its convolution groups hold unequal channel counts")
                continue
            g.cells = cells
            kept_groups.append(g)
        for i, g in enumerate(kept_groups):
            g.index = i
            index = {r: k for k, r in enumerate(g.classes)}
            per_bn: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for r in g.classes:
                for bn, ch in scaled[r]:
                    per_bn[bn].append((ch, index[r]))
            g.bns = [
                (bn, torch.tensor([c for c, _ in pairs]), torch.tensor([k for _, k in pairs]))
                for bn, pairs in ((bn, sorted(p)) for bn, p in per_bn.items())
            ]
            for name in g.layers:  # which output channel of each producer makes which class
                pairs = [
                    (ch, index[atoms.find(a)])
                    for ch, a in enumerate(w.spaces[name])
                    if atoms.find(a) in index
                ]
                g.producers.append(
                    (name, torch.tensor([c for c, _ in pairs]), torch.tensor([k for _, k in pairs]))
                )
        return kept_groups

    def bn_names(self) -> list[str]:
        """BNs whose scales rank prunable channels (those network slimming regularizes)."""
        return sorted({bn for g in self.groups for bn, _, _ in g.bns})

    # -- MACs
    def macs_removed(self, keep: Sequence[torch.Tensor]) -> int:
        """The multiply-accumulates per image that thinning to `keep` (class indices per group)
        removes: what compress.metrics.count_macs says of the thinned model, subtracted from
        what it says of this one, without building the thinned model (a MAC target bisects on
        it). Every conv / linear layer the graph resizes runs once (a shared one is frozen)."""
        if self._macs is None:
            self._macs = self._mac_layers()
        alive = torch.ones(len(self.atoms.parent), dtype=torch.bool)
        for g, k in zip(self.groups, keep, strict=True):
            dropped = torch.ones(g.channels, dtype=torch.bool)
            dropped[k] = False
            alive[torch.tensor(g.classes)[dropped]] = False
        removed = 0
        for layer in self._macs:
            cin = int(alive[layer.ins].sum())
            cout = cin if layer.outs is None else int(alive[layer.outs].sum())
            removed += layer.macs(layer.cin, layer.cout) - layer.macs(cin, cout)
        return removed

    def _mac_layers(self) -> list[_MacLayer]:
        nodes = {str(n.target): n for n in self.gm.graph.nodes if n.op == "call_module"}
        find, out = self.atoms.find, []
        for name, layer in self.walker.layers.items():
            m = layer.module
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            shape = _shape(nodes[name]) or ()
            ins = torch.tensor([find(a) for a in layer.inputs or []], dtype=torch.long)
            space = self.walker.spaces.get(name)
            outs = None if space is None else torch.tensor([find(a) for a in space])
            if isinstance(m, nn.Linear):  # once per position on a channels-last tensor
                per = math.prod(shape[1:-1])
                out.append(_MacLayer(ins, outs, len(ins), len(space or []), 1, per, False))
                continue
            spatial = math.prod(shape[2:]) * math.prod(m.kernel_size)
            depthwise = name in self.walker.depthwise
            cout = len(ins) if outs is None else len(outs)
            out.append(_MacLayer(ins, outs, len(ins), cout, m.groups, spatial, depthwise))
        return out

    # -- thinning
    def thin_(self, keep: Sequence[torch.Tensor]) -> dict[str, dict[str, int]]:
        """Remove from `self.model`, in place, every channel of each group not in `keep` (class
        indices per group). Returns the new width of every layer that changed."""
        atoms = self.atoms
        dropped: set[int] = set()
        for g, k in zip(self.groups, keep, strict=True):
            kept = set(k.tolist())
            dropped |= {r for i, r in enumerate(g.classes) if i not in kept}
        alive = {
            name: [a for a in lst if atoms.find(a) not in dropped]
            for name, lst in self.walker.spaces.items()
        }
        after = _Walker(self.gm, atoms, alive, self.walker.constants)
        after.ref = self.walker.lists
        after.run()
        widths: dict[str, dict[str, int]] = {}
        model = self.model
        for name, old in self.walker.layers.items():
            new = after.layers[name]
            m = model.get_submodule(name)
            out_idx = None
            if name in self.walker.spaces:
                out_idx = _positions(self.walker.spaces[name], alive[name], atoms)
            in_idx = _positions(old.inputs or [], new.inputs or [], atoms)
            w = _resize(m, name, in_idx, out_idx, depthwise=name in self.walker.depthwise)
            if w:
                widths[name] = w
        return widths


@dataclass
class _MacLayer:
    """A conv / linear layer's MACs per image as a function of its input / output widths:
    the formula of compress.metrics.count_macs."""

    ins: torch.Tensor  # the class root of each input channel
    outs: torch.Tensor | None  # of each output channel (None: depthwise, out = in)
    cin: int
    cout: int
    groups: int
    per_pair: int  # output positions x kernel area (1 for a linear layer)
    depthwise: bool

    def macs(self, cin: int, cout: int) -> int:
        if self.depthwise:  # groups == channels: one input channel per output channel
            return cout * self.per_pair
        return cout * (cin // self.groups) * self.per_pair


def _positions(old: list[int], new: list[int], atoms: _Atoms) -> list[int] | None:
    """Where each entry of `new` sat in `old` (repeated atoms matched in order); None when
    nothing changed."""
    if old == new:
        return None
    slots: dict[int, list[int]] = defaultdict(list)
    for i, a in enumerate(old):
        slots[a].append(i)
    taken: dict[int, int] = defaultdict(int)
    out = []
    for a in new:
        out.append(slots[a][taken[a]])
        taken[a] += 1
    return out


@torch.no_grad()
def _resize(
    m: nn.Module,
    name: str,
    in_idx: list[int] | None,
    out_idx: list[int] | None,
    depthwise: bool,
) -> dict[str, int]:
    if in_idx is None and out_idx is None:
        return {}
    if isinstance(m, BNS):
        idx = torch.tensor(in_idx)
        for attr in ("weight", "bias"):
            p = getattr(m, attr)
            if p is not None:
                setattr(m, attr, nn.Parameter(p.data[idx].clone(), p.requires_grad))
        for attr in ("running_mean", "running_var"):
            b = getattr(m, attr)
            if b is not None:
                setattr(m, attr, b[idx].clone())
        m.num_features = len(in_idx)
        return {"num_features": m.num_features}
    if isinstance(m, nn.Linear):
        w = m.weight.data
        if out_idx is not None:
            w = w[torch.tensor(out_idx)]
        if in_idx is not None:
            w = w[:, torch.tensor(in_idx)]
        _set_param(m, "weight", w)
        if out_idx is not None:
            _keep_out_channels(m, torch.tensor(out_idx))
        if m.bias is not None and out_idx is not None:
            _set_param(m, "bias", m.bias.data[torch.tensor(out_idx)])
        m.in_features, m.out_features = w.shape[1], w.shape[0]
        return {"in_features": m.in_features, "out_features": m.out_features}
    assert isinstance(m, nn.Conv2d)
    w = m.weight.data
    if depthwise:
        idx = torch.tensor(in_idx if in_idx is not None else out_idx)
        _set_param(m, "weight", w[idx])
        _keep_out_channels(m, idx)  # one output channel per input channel
        if m.bias is not None:
            _set_param(m, "bias", m.bias.data[idx])
        m.in_channels = m.out_channels = m.groups = len(idx)
        return {"in_channels": len(idx), "out_channels": len(idx), "groups": len(idx)}
    g = m.groups
    cin_old, cout_old = m.in_channels, m.out_channels
    outs = out_idx if out_idx is not None else list(range(cout_old))
    ins = in_idx if in_idx is not None else list(range(cin_old))
    if len(outs) % g or len(ins) % g:
        raise PruneError(f"{name}: {len(ins)} -> {len(outs)} channels do not fit {g} groups")
    in_per_old, in_per_new = cin_old // g, len(ins) // g
    out_per_old, out_per_new = cout_old // g, len(outs) // g
    new = w.new_empty(len(outs), in_per_new, *w.shape[2:])
    for r_new, r_old in enumerate(outs):
        grp = r_old // out_per_old
        if r_new // out_per_new != grp:
            raise PruneError(f"{name}: kept output channels left their group")
        cols = ins[grp * in_per_new : (grp + 1) * in_per_new]
        if any(c // in_per_old != grp for c in cols):
            raise PruneError(f"{name}: kept input channels left their group")
        new[r_new] = w[r_old, [c - grp * in_per_old for c in cols]]
    _set_param(m, "weight", new)
    if out_idx is not None:
        _keep_out_channels(m, torch.tensor(out_idx))
    if m.bias is not None and out_idx is not None:
        _set_param(m, "bias", m.bias.data[torch.tensor(out_idx)])
    m.in_channels, m.out_channels = len(ins), len(outs)
    return {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": g}


def _keep_out_channels(m: nn.Module, idx: torch.Tensor) -> None:
    """Thin the per-output-channel state of a quantized layer's weight quantizer (LSQ's learned
    step) to the kept output channels `idx`, as its weight was."""
    keep = getattr(getattr(m, "weight_quant", None), "keep_out_channels_", None)
    if keep is not None:
        keep(idx)


def _set_param(m: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(m, attr)
    setattr(m, attr, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


@torch.no_grad()
def apply_widths_(model: nn.Module, widths: dict[str, dict[str, int]]) -> nn.Module:
    """Give a freshly built model the layer widths of a pruned one (weights uninitialized, to be
    loaded from its state dict): the per-layer spec that rebuilds a pruned model with no code.
    A detector's layer names are its core's (compress.detection.models.core_of)."""
    whole, model = model, core_of(model)
    for name, w in widths.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise PruneError(
                f"pruned widths name a layer {name!r} the model does not have"
            ) from None
        if isinstance(m, BNS):
            n = w["num_features"]
            m.num_features = n
            if m.weight is not None:
                m.weight = nn.Parameter(m.weight.new_ones(n))
                m.bias = nn.Parameter(m.bias.new_zeros(n))
            if m.running_mean is not None:
                m.running_mean = m.running_mean.new_zeros(n)
                m.running_var = m.running_var.new_ones(n)
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = w["in_features"], w["out_features"]
            m.weight = nn.Parameter(m.weight.new_empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(m.out_features))
        elif isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels = w["in_channels"], w["out_channels"]
            m.groups = w["groups"]
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            m.weight = nn.Parameter(m.weight.new_empty(shape))
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_empty(m.out_channels))
        else:
            raise PruneError(f"pruned widths for {name}: {type(m).__name__} is not resizable")
    return whole
