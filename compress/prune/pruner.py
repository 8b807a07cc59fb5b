"""Network slimming (Liu et al., 2017): rank channels by importance, keep the strongest.

The groups come from the channel-dependency graph (`graph.py`); every group's channels are
split into *cells* (channels that share a producer group and a consumer group after any
channel shuffle), and every cell of a group keeps the same number of channels: exactly what
keeps group convolutions and shuffles valid after thinning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from compress.config import PRUNERS, validate_pruner
from compress.errors import ConfigError
from compress.prune.graph import (
    ChannelGraph,
    Importance,
    PruneError,
    apply_widths_,
    bn_scale_importance,
)


def validate(kind: str, percent: float, base: int, min_channels: int | None) -> None:
    validate_pruner({"name": kind, "percent": percent, "base": base, "min_channels": min_channels})


def example_input(model: nn.Module, image_shape: Sequence[int]) -> torch.Tensor:
    """A batch of two zero images on the model's device (two: BN in train mode needs > 1)."""
    p = next(model.parameters(), None)
    return torch.zeros(2, *image_shape, device=p.device if p is not None else "cpu")


def channel_graph(
    model: nn.Module, image_shape: Sequence[int], leaves: Sequence[type[nn.Module]] = ()
) -> ChannelGraph:
    """The coupled channel groups of `model` for inputs of shape (C, H, W)."""
    graph = ChannelGraph(model, example_input(model, image_shape), leaves)
    if not graph.groups:
        name = getattr(model, "arch", {}).get("name", type(model).__name__)
        raise PruneError(
            f"model {name} has no prunable channels: every conv output is either read by an "
            "op the channel graph does not know, or not scaled by a BatchNorm (network slimming "
            "ranks channels by BN scales)"
        )
    return graph


def has_group_convs(model: nn.Module) -> bool:
    """Grouped convs other than depthwise ones (those prune like channel-wise ops)."""
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())


def select_channels(
    graph: ChannelGraph,
    kind: str = "normal",
    percent: float = 0.5,
    base: int = 1,
    min_channels: int | None = None,
    importance: Importance = bn_scale_importance,
) -> list[torch.Tensor]:
    """Indices of the channels each group keeps (sorted), from one global threshold.

    normal: any count; regular: counts are multiples of `base`; gc: group-conv models, counts
    are multiples of the number of cells. No group keeps fewer than `min_channels` (default:
    `base`), and none keeps more than it has. A percent that would empty a group is refused
    unless `min_channels` says how many to keep.
    """
    validate(kind, percent, base, min_channels)
    model = graph.model
    grouped = has_group_convs(model)
    if kind == "gc" and not grouped:
        raise ConfigError(
            "pruner=gc is for group-convolution models (nin_gc) and this model has "
            "none: use pruner=normal or pruner=regular"
        )
    if kind != "gc" and grouped:
        raise ConfigError(
            f"pruner={kind} would break the group convolutions of this model: use pruner=gc"
        )
    step_base = base if kind == "regular" else 1
    scores = [importance(model, g).float() for g in graph.groups]
    every = torch.cat(scores)
    threshold = torch.quantile(every, percent) if percent > 0 else every.min() - 1
    keep = []
    for g, score in zip(graph.groups, scores, strict=True):
        ncells = len(g.cells)
        step = math.lcm(ncells, step_base)
        wanted = int((score > threshold).sum())
        if wanted == 0 and min_channels is None and percent > 0:
            raise PruneError(
                f"pruner.percent={percent} would remove every channel of the group at "
                f"{', '.join(g.layers[:3])} ({g.channels} channels): lower pruner.percent or "
                "set pruner.min_channels"
            )
        lowest = max(min_channels or base, 1)
        total = max(round(wanted / step) * step, math.ceil(lowest / step) * step)
        total = min(total, (g.channels // step) * step or g.channels)
        per_cell = total // ncells
        kept = [cell[score[cell].argsort(descending=True)[:per_cell]] for cell in g.cells]
        keep.append(torch.cat(kept).sort().values)
    return keep


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
) -> nn.Module:
    """A new, smaller model holding only the kept channels of `model`.

    Its `pruned_widths` (layer name -> new width) are what a checkpoint stores to rebuild it.
    """
    small = copy.deepcopy(model)
    widths = channel_graph(small, image_shape, leaves).thin_(keep)
    small.pruned_widths = {**getattr(model, "pruned_widths", {}), **widths}
    return small.train(model.training)


__all__ = [
    "PRUNERS",
    "PruneError",
    "apply_widths_",
    "channel_graph",
    "has_group_convs",
    "mask_",
    "select_channels",
    "thin",
    "validate",
]
