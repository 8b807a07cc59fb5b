"""Channel selection: rank channels by an importance, keep the strongest (network slimming,
Liu et al. 2017, when the importance is |BN gamma|).

The groups come from the channel-dependency graph (`graph.py`); every group's channels are
split into *cells* (channels that share a producer group and a consumer group after any
channel shuffle), and every cell of a group keeps the same number of channels: exactly what
keeps group convolutions and shuffles valid after thinning.

`scope=global` ranks all groups against one threshold, `scope=layer` takes the same fraction
from every group; `target=channels` removes `percent` of the channels, `target=macs` bisects
the threshold (or the fraction) until the thinned model has (1 - percent) of the MACs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compress.config import PRUNERS, validate_pruner
from compress.errors import ConfigError
from compress.metrics import count_macs
from compress.prune.graph import ChannelGraph, Importance, PruneError, apply_widths_
from compress.prune.importance import bn_scale_importance

log = logging.getLogger(__name__)


def validate(
    kind: str, percent: float, base: int, min_channels: int | None, **more: object
) -> None:
    """Range checks of the pruner keys given (the others take their defaults)."""
    validate_pruner(
        {"name": kind, "percent": percent, "base": base, "min_channels": min_channels, **more}
    )


def example_input(model: nn.Module, image_shape: Sequence[int]) -> torch.Tensor:
    """A batch of two zero images on the model's device (two: BN in train mode needs > 1)."""
    p = next(model.parameters(), None)
    return torch.zeros(2, *image_shape, device=p.device if p is not None else "cpu")


def channel_graph(
    model: nn.Module,
    image_shape: Sequence[int],
    leaves: Sequence[type[nn.Module]] = (),
    require_bn: bool = True,
) -> ChannelGraph:
    """The coupled channel groups of `model` for inputs of shape (C, H, W); `require_bn`: only
    BN-scaled channels (see ChannelGraph; `needs_bn(importance)` says which criteria)."""
    graph = ChannelGraph(model, example_input(model, image_shape), leaves, require_bn)
    if not graph.groups:
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        _, total, why = graph.frozen_channels()
        reasons = "; ".join(f"{n} {reason}" for reason, n in list(why.items())[:3])
        raise PruneError(
            f"model {name} has no prunable channels: all {total} conv / linear output channels "
            f"are frozen ({reasons})"
        )
    return graph


def needs_bn(importance: str) -> bool:
    """Whether `pruner.importance=importance` ranks BN scales or BN outputs (bn_scale, taylor):
    then only BN-scaled channels are prunable."""
    return importance in ("bn_scale", "taylor")


def frozen_summary(graph: ChannelGraph) -> str:
    """'N of M channels frozen: n1 reason1; n2 reason2' (or that none is)."""
    frozen, total, why = graph.frozen_channels()
    if not frozen:
        return f"0 of {total} channels frozen"
    return f"{frozen} of {total} channels frozen: " + "; ".join(
        f"{n} {reason}" for reason, n in why.items()
    )


def has_group_convs(model: nn.Module) -> bool:
    """Grouped convs other than depthwise ones (those prune like channel-wise ops)."""
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())


@dataclass
class Reference:
    """The model `percent` and `min_ratio` are fractions of: the original model when it is
    pruned in several steps (default: the model being pruned)."""

    layers: list[tuple[str, ...]]  # each group's producing layers (the groups must match)
    channels: list[int]  # each group's channels
    macs: int  # per image

    @classmethod
    def of(cls, graph: ChannelGraph) -> Reference:
        return cls(
            [tuple(g.layers) for g in graph.groups],
            [g.channels for g in graph.groups],
            count_macs(graph.model, graph.image_shape),
        )


def agp_schedule(percent: float, steps: int) -> list[float]:
    """The fraction removed after each of `steps` steps on Zhu & Gupta's (2017) cubic schedule,
    s_k = s_f (1 - (1 - k / K)^3): big steps while there is redundancy, small ones at the end."""
    return [percent * (1 - (1 - k / steps) ** 3) for k in range(1, steps + 1)]


def select_channels(
    graph: ChannelGraph,
    kind: str = "normal",
    percent: float = 0.5,
    base: int = 1,
    min_channels: int | None = None,
    importance: Importance = bn_scale_importance,
    scope: str = "global",
    target: str = "channels",
    min_ratio: float = 0.0,
    reference: Reference | None = None,
) -> list[torch.Tensor]:
    """Indices of the channels each group keeps (sorted).

    normal: any count; regular: counts are multiples of `base`; gc: group-conv models, counts
    are multiples of the number of cells. No group keeps fewer than its floor,
    max(`min_channels` (default: `base`), `min_ratio` x its channels, 1), and none keeps more
    than it has. With target=channels a percent that would empty a group is refused unless
    `min_channels` or `min_ratio` sets a floor; with target=macs the floors always hold, and a
    percent they make unreachable is refused with the most MACs that can be removed.
    `reference`: the model `percent` and `min_ratio` refer to (default: this one).
    """
    validate(kind, percent, base, min_channels, scope=scope, target=target, min_ratio=min_ratio)
    model = graph.model
    grouped = has_group_convs(model)
    if kind == "gc" and not grouped:
        raise ConfigError(
            "pruner=gc is for group-convolution models (nin_gc) and this model has "
            "none: use pruner=normal or pruner=regular"
        )
    if kind == "normal" and grouped:  # what gc does: every cell of a group keeps one count
        log.info(
            "pruner=normal on a model with group convolutions: each group's channels are "
            "removed evenly across its convolution groups (as pruner=gc does)"
        )
        kind = "gc"
    if kind == "regular" and grouped:
        raise ConfigError(
            "pruner=regular would break the group convolutions of this model (multiples of "
            "pruner.base need not split evenly across them): use pruner=normal or pruner=gc"
        )
    if reference is not None and reference.layers != [tuple(g.layers) for g in graph.groups]:
        raise PruneError(
            "the reference model's channel groups differ from this model's: prune steps must "
            "start from the same architecture"
        )
    ref = reference.channels if reference is not None else [g.channels for g in graph.groups]
    floors = [max(min_channels or base, math.ceil(round(min_ratio * r, 9)), 1) for r in ref]
    scores = [importance(model, g).float() for g in graph.groups]
    sel = _Selection(graph, scores, floors, ref, base if kind == "regular" else 1)
    if target == "macs":
        macs = reference.macs if reference is not None else None
        return sel.for_macs(percent, scope, macs)
    strict = min_channels is None and min_ratio == 0 and percent > 0
    if scope == "layer":
        return sel.keep(sel.layer_counts(percent), percent, strict)
    p = percent
    if reference is not None:  # the fraction of this model's channels that leaves the goal
        p = max(0.0, 1 - (1 - percent) * sum(ref) / sum(g.channels for g in graph.groups))
    every = torch.cat(sel.scores)
    threshold = torch.quantile(every, p) if p > 0 else every.min() - 1
    return sel.keep(sel.global_counts(threshold), percent, strict)


class _Selection:
    """The channels each group keeps for a given threshold (scope=global) or fraction
    (scope=layer): counts rounded to the group's step, clamped to its floor and size."""

    def __init__(
        self,
        graph: ChannelGraph,
        scores: list[torch.Tensor],
        floors: list[int],
        ref: list[int],
        step_base: int,
    ) -> None:
        self.graph, self.scores, self.floors, self.ref = graph, scores, floors, ref
        self.step_base = step_base
        # strongest first, within each cell (fewer kept = a prefix: MACs fall monotonically)
        self.orders = [
            [cell[score[cell].argsort(descending=True)] for cell in g.cells]
            for g, score in zip(graph.groups, scores, strict=True)
        ]

    def global_counts(self, threshold: torch.Tensor | float) -> list[int]:
        return [int((s > threshold).sum()) for s in self.scores]

    def layer_counts(self, fraction: float) -> list[int]:
        """Each group keeps (1 - fraction) of its reference channels (half rounded up)."""
        return [
            min(g.channels, max(r - math.floor(fraction * r + 0.5), 0))
            for g, r in zip(self.graph.groups, self.ref, strict=True)
        ]

    def keep(self, wanted: list[int], percent: float, strict: bool) -> list[torch.Tensor]:
        keep = []
        rows = zip(self.graph.groups, wanted, self.floors, self.orders, strict=True)
        for g, n, floor, order in rows:
            if n == 0 and strict:
                raise PruneError(
                    f"pruner.percent={percent} would remove every channel of the group at "
                    f"{', '.join(g.layers[:3])} ({g.channels} channels): lower pruner.percent "
                    "or set pruner.min_channels or pruner.min_ratio"
                )
            ncells = len(g.cells)
            step = math.lcm(ncells, self.step_base)
            total = max(round(n / step) * step, math.ceil(floor / step) * step)
            total = min(total, (g.channels // step) * step or g.channels)
            per_cell = total // ncells
            keep.append(torch.cat([o[:per_cell] for o in order]).sort().values)
        return keep

    def for_macs(
        self, percent: float, scope: str, reference_macs: int | None
    ) -> list[torch.Tensor]:
        """Bisect on the threshold (or fraction) for the MACs nearest to (1 - percent) of the
        reference's: adjacent levels differ by one channel (per group, for scope=layer)."""
        graph = self.graph
        full = count_macs(graph.model, graph.image_shape)
        ref_macs = full if reference_macs is None else reference_macs
        goal = (1 - percent) * ref_macs
        values = torch.cat(self.scores).unique()  # scope=global, level i: the i lowest go
        top = max(self.ref) if scope == "layer" else len(values)

        def counts(level: int) -> list[int]:
            if scope == "layer":  # level j: the fraction j / top (every count is some level's)
                return self.layer_counts(level / top)
            return self.global_counts(values[level - 1] if level else -math.inf)

        def at(level: int) -> tuple[int, list[torch.Tensor]]:
            keep = self.keep(counts(level), percent, strict=False)
            return full - graph.macs_removed(keep), keep

        least, keep = at(top)
        if least > goal:
            raise PruneError(
                f"pruner.percent={percent} of the MACs cannot be removed: the floors (every "
                "layer keeps max(min_channels or base, min_ratio x its channels, 1)) leave "
                f"{least} of {ref_macs}, so at most {1 - least / ref_macs:.4f} can go; lower "
                "pruner.percent, pruner.min_ratio or pruner.min_channels"
            )
        lo, hi = 0, top
        macs_lo, keep_lo = at(0)
        if macs_lo <= goal:
            return keep_lo
        macs_hi, keep_hi = least, keep
        while hi - lo > 1:  # macs(lo) > goal >= macs(hi)
            mid = (lo + hi) // 2
            macs, k = at(mid)
            if macs <= goal:
                hi, macs_hi, keep_hi = mid, macs, k
            else:
                lo, macs_lo, keep_lo = mid, macs, k
        return keep_lo if macs_lo - goal < goal - macs_hi else keep_hi


@torch.no_grad()
def mask_(graph: ChannelGraph, keep: Sequence[torch.Tensor]) -> nn.Module:
    """Zero the BN scale and shift of every channel not kept (the 'masked' model): in eval mode
    those channels output exactly zero, so it computes what the thinned model computes."""
    model = graph.model
    for g, idx in zip(graph.groups, keep, strict=True):
        dropped = torch.ones(g.channels, dtype=torch.bool)
        dropped[idx] = False
        for bn, chans, classes in g.bns:
            m = model.get_submodule(bn)
            sel = chans[dropped[classes]]
            m.weight[sel] = 0.0
            m.bias[sel] = 0.0
    return model


def thin(
    model: nn.Module,
    keep: Sequence[torch.Tensor],
    image_shape: Sequence[int],
    leaves: Sequence[type[nn.Module]] = (),
    require_bn: bool = True,
) -> nn.Module:
    """A new, smaller model holding only the kept channels of `model` (`keep`: per group of the
    graph built with the same `leaves` and `require_bn`).

    Its `pruned_widths` (layer name -> new width) are what a checkpoint stores to rebuild it.
    """
    small = copy.deepcopy(model)
    widths = channel_graph(small, image_shape, leaves, require_bn).thin_(keep)
    small.pruned_widths = {**getattr(model, "pruned_widths", {}), **widths}
    return small.train(model.training)


__all__ = [
    "PRUNERS",
    "PruneError",
    "Reference",
    "agp_schedule",
    "apply_widths_",
    "channel_graph",
    "has_group_convs",
    "mask_",
    "select_channels",
    "thin",
    "validate",
]
