"""Network-in-Network (Lin et al., 2014) as in the seed project, and its group-conv variant."""

from __future__ import annotations

from compress.models.plain import Layer, PlainNet
from compress.models.registry import register_model

_MAX3 = ("max", 3, 2, 1)
_MAX2 = ("max", 2, 2, 0)

NIN_CHANNELS = [192, 160, 96, 192, 192, 192, 192, 192]
NIN_LAYERS = [
    Layer(5),
    Layer(1),
    Layer(1, pool=_MAX3),
    Layer(5),
    Layer(1),
    Layer(1, pool=_MAX3),
    Layer(3),
    Layer(1),
]

NIN_GC_CHANNELS = [256, 256, 256, 512, 512, 512, 1024, 1024]
_GROUPS = [1, 2, 2, 16, 4, 4, 32, 8]
_KERNELS = [5, 1, 1, 3, 1, 1, 3, 1]
_POOLS = {2: _MAX2, 5: _MAX2}
# A channel shuffle before every group conv after the second, mixing the previous layer's groups.
NIN_GC_LAYERS = [
    Layer(k, groups=g, shuffle=_GROUPS[i - 1] if i >= 2 else 0, pool=_POOLS.get(i))
    for i, (k, g) in enumerate(zip(_KERNELS, _GROUPS, strict=True))
]


@register_model
def nin(
    num_classes: int = 10,
    in_channels: int = 3,
    channels: list[int] | None = None,
    order: str = "cbap",
    bn_momentum: float = 0.1,
) -> PlainNet:
    """NIN: 8 conv layers (5x5/1x1 mlpconv stacks), 1x1 classifier conv, global average pool."""
    channels = list(channels or NIN_CHANNELS)
    return PlainNet(NIN_LAYERS, channels, num_classes, in_channels, order, bn_momentum, "nin")


@register_model
def nin_gc(
    num_classes: int = 10,
    in_channels: int = 3,
    channels: list[int] | None = None,
    order: str = "cbap",
    bn_momentum: float = 0.1,
) -> PlainNet:
    """NIN built from group convolutions with channel shuffle (fewer parameters, wider layers)."""
    channels = list(channels or NIN_GC_CHANNELS)
    return PlainNet(NIN_GC_LAYERS, channels, num_classes, in_channels, order, bn_momentum, "nin_gc")
