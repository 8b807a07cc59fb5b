"""VGG-Small (Zhang et al., LQ-Nets 2018): the usual CIFAR baseline for low-bit networks."""

from __future__ import annotations

from compress.models.plain import Layer, PlainNet
from compress.models.registry import register_model

_MAX2 = ("max", 2, 2, 0)
VGG_SMALL_CHANNELS = [128, 128, 256, 256, 512, 512]
VGG_SMALL_LAYERS = [
    Layer(3),
    Layer(3, pool=_MAX2),
    Layer(3),
    Layer(3, pool=_MAX2),
    Layer(3),
    Layer(3, pool=_MAX2),
]


@register_model
def vgg_small(
    num_classes: int = 10,
    in_channels: int = 3,
    channels: list[int] | None = None,
    order: str = "cbap",
    bn_momentum: float = 0.1,
) -> PlainNet:
    """Six 3x3 conv blocks (128-128-M-256-256-M-512-512-M), global average pool, linear head."""
    channels = list(channels or VGG_SMALL_CHANNELS)
    return PlainNet(
        VGG_SMALL_LAYERS,
        channels,
        num_classes,
        in_channels,
        order,
        bn_momentum,
        "vgg_small",
        head="linear",
    )
