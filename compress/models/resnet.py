"""CIFAR ResNets of He et al. (2016): 3 stages of 16/32/64 channels, 6n+2 layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import check
from compress.models.blocks import Activation
from compress.models.registry import register_model


class Shortcut(nn.Module):
    """Option A shortcut: subsample and zero-pad channels (parameter-free, as in the paper)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN, plus shortcut, then act. `mid` channels are prunable; `out` are not,
    because they are summed with the shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, momentum=bn_momentum)
        self.act1 = Activation()
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=bn_momentum)
        self.shortcut = Shortcut(stride, cout - cin)
        self.act2 = Activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int,
        channels: list[int] | None,
        bn_momentum: float,
    ) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [16, 32, 64]
        mids = list(channels) if channels else [w for w in widths for _ in range(n)]
        check(
            len(mids) == 3 * n and all(c >= 1 for c in mids),
            "model.channels",
            channels,
            f"a list of {3 * n} positive inner-block channel counts for resnet{depth}",
        )
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, momentum=bn_momentum)
        self.act1 = Activation()
        blocks, cin = [], 16
        for stage, w in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, mids[stage * n + i], w, stride, bn_momentum))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _resnet(depth: int):
    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        channels: list[int] | None = None,
        bn_momentum: float = 0.1,
    ) -> ResNet:
        return ResNet(depth, num_classes, in_channels, channels, bn_momentum)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"ResNet-{depth} for 32x32 images ({(depth - 2) // 6} blocks per stage)."
    return register_model(build)


resnet20 = _resnet(20)
resnet32 = _resnet(32)
resnet56 = _resnet(56)


class Residual(nn.Module):
    """x + f(x) with f = two conv-BN-act blocks of the same width."""

    def __init__(self, channels: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.act1 = Activation()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=bn_momentum)
        self.act2 = Activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class GlobalMaxPool(nn.AdaptiveMaxPool2d):
    """The maximum over all positions, written as a max pool whose kernel is the whole feature
    map, so that it exports as ONNX MaxPool: `nn.AdaptiveMaxPool2d(1)` exports at opset 18 as
    ReduceMax + Reshape, which ONNX Runtime's symbolic shape inference (calibrate.py) and ncnn
    cannot take. A subclass of it with no weights: the values, the checkpoints and every
    isinstance check (pruning graph, BN fusion, QDQ export) stay those of the adaptive pool."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():  # TorchScript (opset 17) would trace the kernel size as
            # a tensor; its export of the adaptive pool is a full-map MaxPool as well
            return F.adaptive_max_pool2d(x, 1)
        return F.max_pool2d(x, kernel_size=x.shape[-2:])

    def extra_repr(self) -> str:
        return ""


def _down(cin: int, cout: int, bn_momentum: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cout, momentum=bn_momentum),
        Activation(),
        nn.MaxPool2d(2),
    )


@register_model
def resnet9(
    num_classes: int = 10,
    in_channels: int = 3,
    width: int = 64,
    bn_momentum: float = 0.1,
    logit_scale: float = 0.125,
) -> nn.Module:
    """ResNet-9 of the DAWNBench fast-training record (Page, 2018): prep conv, three
    conv-pool stages (residual blocks after the first and third), max pool, linear head whose
    logits are multiplied by `logit_scale` (0.125 in the original: it tames the early, high-LR
    steps). `width` 64 is the original (94% in 24 epochs on a GPU); 16 trains fast on a CPU."""
    w = width
    net = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w, momentum=bn_momentum),
        Activation(),
        _down(w, 2 * w, bn_momentum),
        Residual(2 * w, bn_momentum),
        _down(2 * w, 4 * w, bn_momentum),
        _down(4 * w, 8 * w, bn_momentum),
        Residual(8 * w, bn_momentum),
        GlobalMaxPool(),
        nn.Flatten(),
        nn.Linear(8 * w, num_classes, bias=False),
        Scale(logit_scale),
    )
    return net
