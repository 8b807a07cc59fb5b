"""Network slimming (Liu et al., 2017): rank channels by |BN gamma|, keep the strongest.

A prunable *unit* is one entry of a model's channel spec: the output channels of one conv,
scaled by one BN, read by the next layer. Its channels are split into *cells*: the channels
that share a producer group and a consumer group (after any channel shuffle). Every cell of a
unit keeps the same number of channels, which is exactly what keeps group convolutions and
shuffles valid after thinning (one cell per unit in a model without group convs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError, ConfigError, check, check_choice
from compress.models.plain import PlainNet
from compress.models.resnet import ResNet

PRUNERS = ("normal", "regular", "gc")


class PruneError(CompressError):
    """The model or checkpoint cannot be pruned as asked."""


@dataclass
class Unit:
    index: int  # position in the model's channel spec
    bn: nn.BatchNorm2d  # its |gamma| ranks the channels
    cells: list[torch.Tensor]  # channel indices that must keep equal counts

    @property
    def channels(self) -> int:
        return self.bn.num_features


def shuffle_positions(channels: int, groups: int) -> torch.Tensor:
    """pos[c]: where ChannelShuffle(groups) moves channel c (identity when groups <= 1)."""
    c = torch.arange(channels)
    if groups <= 1:
        return c
    per = channels // groups
    return (c % per) * groups + c // per


def make_cells(channels: int, producer_groups: int, consumer_groups: int, shuffle: int):
    c = torch.arange(channels)
    prod = c // (channels // producer_groups)
    cons = shuffle_positions(channels, shuffle) // (channels // consumer_groups)
    key = prod * consumer_groups + cons
    cells = [c[key == k] for k in key.unique()]
    if len({len(x) for x in cells}) != 1:
        raise PruneError(
            f"channel groups of sizes {[len(x) for x in cells]} cannot be pruned evenly"
        )
    return cells


def _plain_consumers(model: PlainNet) -> list[tuple[nn.Module, int]]:
    """For each block of a PlainNet: the layer that reads its output, and that layer's shuffle."""
    blocks = [m for m in model.features if hasattr(m, "conv")]
    readers = [(b.conv, b.shuffle.groups if b.shuffle else 0) for b in blocks[1:]]
    head = model.classifier.conv if model.head == "conv" else model.classifier
    return [*readers, (head, 0)]


def prunable_units(model: nn.Module) -> list[Unit]:
    """The units of a supported model, in channel-spec order."""
    if isinstance(model, PlainNet):
        blocks = [m for m in model.features if hasattr(m, "conv")]
        if any(b.order != "cbap" for b in blocks):
            raise PruneError(
                "pruning needs model.order=cbap (BN after its conv); this model uses bacp"
            )
        units = []
        for i, (block, (reader, shuffle)) in enumerate(
            zip(blocks, _plain_consumers(model), strict=True)
        ):
            groups_in = getattr(reader, "groups", 1)
            cells = make_cells(block.conv.out_channels, block.conv.groups, groups_in, shuffle)
            units.append(Unit(i, block.bn, cells))
        return units
    if isinstance(model, ResNet):
        return [
            Unit(i, b.bn1, [torch.arange(b.bn1.num_features)]) for i, b in enumerate(model.layers)
        ]
    name = getattr(model, "arch", {}).get("name", type(model).__name__)
    raise PruneError(
        f"model {name} has no prunable BN layers that this pruner knows; "
        "prunable models: nin, nin_gc, vgg_small, resnet20, resnet32, resnet56"
    )


def has_group_convs(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def validate(kind: str, percent: float, base: int, min_channels: int | None) -> None:
    check_choice("pruner.name", kind, PRUNERS)
    check(
        isinstance(percent, int | float) and 0 <= percent < 1,
        "pruner.percent",
        percent,
        "a fraction in [0, 1)",
    )
    check(isinstance(base, int) and base >= 1, "pruner.base", base, "an integer >= 1")
    check(
        min_channels is None or (isinstance(min_channels, int) and min_channels >= 1),
        "pruner.min_channels",
        min_channels,
        "null or an integer >= 1",
    )


def select_channels(
    model: nn.Module,
    kind: str = "normal",
    percent: float = 0.5,
    base: int = 1,
    min_channels: int | None = None,
) -> list[torch.Tensor]:
    """Indices of the channels each unit keeps (sorted), from one global |gamma| threshold.

    normal: any count; regular: counts are multiples of `base`; gc: group-conv models, counts
    are multiples of the number of cells. No unit keeps fewer than `min_channels` (default:
    `base`), and none keeps more than it has.
    """
    validate(kind, percent, base, min_channels)
    units = prunable_units(model)
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
    gammas = torch.cat([u.bn.weight.detach().abs() for u in units])
    threshold = torch.quantile(gammas, percent) if percent > 0 else gammas.min() - 1
    keep = []
    for u in units:
        g = u.bn.weight.detach().abs()
        ncells = len(u.cells)
        step = math.lcm(ncells, step_base)
        wanted = int((g > threshold).sum())
        lowest = max(min_channels or base, 1)
        total = max(round(wanted / step) * step, math.ceil(lowest / step) * step)
        total = min(total, (u.channels // step) * step or u.channels)
        per_cell = total // ncells
        kept = [cell[g[cell].argsort(descending=True)[:per_cell]] for cell in u.cells]
        keep.append(torch.cat(kept).sort().values)
    return keep


@torch.no_grad()
def mask_(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Zero the BN scale and shift of every channel not kept (the 'masked' model): in eval mode
    those channels output exactly zero, so it computes what the thinned model computes."""
    for unit, idx in zip(prunable_units(model), keep, strict=True):
        dropped = torch.ones(unit.channels, dtype=torch.bool)
        dropped[idx] = False
        unit.bn.weight[dropped] = 0.0
        unit.bn.bias[dropped] = 0.0
    return model
