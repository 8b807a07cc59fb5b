"""A group of coupled channels, and the type of an importance criterion that scores one.

Its own module so that the criteria (`importance.py`) and the graph that builds groups
(`graph.py`) both depend on it and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Group:
    """Coupled channels pruned together: `classes` are their atom classes, in the order of the
    first layer that produces them; `cells` split them into parts that keep equal counts."""

    index: int
    layers: list[str]  # the conv / linear layers producing these channels
    classes: list[int]
    cells: list[torch.Tensor]  # indices into `classes`
    # (BN name, its channels that scale this group, the class index of each of them)
    bns: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (producing layer, its output channels in this group, the class index of each of them);
    # depthwise convs are not producers: they carry channel i to channel i
    producers: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return len(self.classes)


# An importance criterion: one score per channel (class) of the group, higher = kept first.
Importance = Callable[[nn.Module, Group], torch.Tensor]
