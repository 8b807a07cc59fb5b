"""Plain (non-residual) conv nets described by a layer list: the base of NIN, NIN-GC and VGG."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import ConfigError, check, check_choice
from compress.models.blocks import ORDERS, ConvBlock


@dataclass(frozen=True)
class Layer:
    kernel: int
    groups: int = 1
    shuffle: int = 0  # channel-shuffle groups applied to this layer's input (0: none)
    pool: tuple[str, int, int, int] | None = None  # (kind, kernel, stride, padding) after the layer


def _pool(spec: tuple[str, int, int, int]) -> nn.Module:
    kind, k, s, p = spec
    return nn.MaxPool2d(k, s, p) if kind == "max" else nn.AvgPool2d(k, s, p)


class PlainNet(nn.Module):
    """A stack of conv blocks, then the head: a 1x1 conv classifier with BN and ReLU followed by
    global pooling (`head="conv"`, NIN), or global pooling and a linear layer (`head="linear"`).

    In `bacp` order the first layer stays conv -> BN (it sees the image), every later block is
    BN -> act -> conv, and a BN -> ReLU closes the stack before the classifier, following the
    binary-network layout of XNOR-Net and the seed project.
    """

    def __init__(
        self,
        layers: list[Layer],
        channels: list[int],
        num_classes: int,
        in_channels: int,
        order: str = "cbap",
        bn_momentum: float = 0.1,
        name: str = "model",
        head: str = "conv",
    ) -> None:
        super().__init__()
        check_choice("model.order", order, ORDERS)
        check(
            len(channels) == len(layers),
            "model.channels",
            channels,
            f"a list of {len(layers)} channel counts",
        )
        for i, (c, layer) in enumerate(zip(channels, layers, strict=True)):
            cin = in_channels if i == 0 else channels[i - 1]
            if c < 1 or c % layer.groups or cin % layer.groups:
                raise ConfigError(
                    f"model.channels={channels} is invalid for {name}: layer {i} needs in and out "
                    f"channels divisible by its {layer.groups} groups (got {cin} -> {c})"
                )
        mods: list[nn.Module] = []
        cin = in_channels
        for i, (c, layer) in enumerate(zip(channels, layers, strict=True)):
            if order == "cbap" or i == 0:
                block = ConvBlock(
                    cin,
                    c,
                    layer.kernel,
                    groups=layer.groups,
                    order="cbap",
                    act=(order == "cbap"),
                    bn_momentum=bn_momentum,
                    shuffle=layer.shuffle,
                )
            else:
                block = ConvBlock(
                    cin,
                    c,
                    layer.kernel,
                    groups=layer.groups,
                    order="bacp",
                    bn_momentum=bn_momentum,
                    shuffle=layer.shuffle,
                )
            mods.append(block)
            if layer.pool:
                mods.append(_pool(layer.pool))
            cin = c
        if order == "bacp":
            mods += [nn.BatchNorm2d(cin, momentum=bn_momentum), nn.ReLU()]
        self.features = nn.Sequential(*mods)
        self.head = head
        if head == "conv":
            self.classifier = ConvBlock(cin, num_classes, 1, act=nn.ReLU(), bn_momentum=bn_momentum)
        else:
            self.classifier = nn.Linear(cin, num_classes)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.head == "conv":
            return self.pool(self.classifier(x)).flatten(1)
        return self.classifier(self.pool(x).flatten(1))
