"""Building blocks shared by the models: conv-BN-activation in either layer order."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import check_choice

ORDERS = ("cbap", "bacp")


class Activation(nn.Module):
    """A slot for an activation that quantization may replace (ReLU by default).

    Models put an `Activation` wherever a quantized layer's input is produced; plain
    `nn.ReLU` marks activations that must stay full precision (e.g. on the logits).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fn: nn.Module = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class ChannelShuffle(nn.Module):
    """ShuffleNet channel shuffle: mix channels across the previous layer's groups."""

    export_as_gather = True  # the form an ONNX export writes (see forward)

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        exporting = torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
        if exporting and self.export_as_gather:
            # one Gather on the channel axis: ONNX Runtime keeps its NHWC / NCHWc layouts through
            # it, while a 5-D reshape + transpose makes it convert layouts around it (1.5x slower
            # int8 NIN-GC); ncnn has no such Gather and takes the reshape form
            order = torch.arange(c, device=x.device).view(self.groups, c // self.groups)
            return x.index_select(1, order.t().reshape(-1))
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class ConvBlock(nn.Module):
    """Conv, BN and activation as one unit.

    order="cbap": conv -> BN(out) -> act (the usual order; BN scales prune this conv's outputs).
    order="bacp": BN(in) -> act -> conv (better for binary activations: the sign sees a
    normalized input, and the conv consumes the quantized activation directly).
    `act=False` leaves the activation out (a stem whose output is normalized by the next block).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        order: str = "cbap",
        act: bool | nn.Module = True,
        bn_momentum: float = 0.1,
        shuffle: int = 0,
    ) -> None:
        super().__init__()
        check_choice("model.order", order, ORDERS)
        self.order = order
        self.shuffle = ChannelShuffle(shuffle) if shuffle > 1 else None
        bn_channels = out_channels if order == "cbap" else in_channels
        self.bn = nn.BatchNorm2d(bn_channels, momentum=bn_momentum)
        if isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = Activation() if act else nn.Identity()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order == "cbap":
            if self.shuffle is not None:
                x = self.shuffle(x)
            return self.act(self.bn(self.conv(x)))
        x = self.act(self.bn(x))
        if self.shuffle is not None:
            x = self.shuffle(x)
        return self.conv(x)
