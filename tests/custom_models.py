"""A user's own models, as `model=custom model.target=tests.custom_models.small_cnn` finds them."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block, two concatenated 1x1 branches, pool, linear head:
    the structures a channel graph has to follow in a model it has never seen."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.relu = nn.ReLU()
        self.conv_a = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(w)
        self.relu_a = nn.ReLU()
        self.left = nn.Sequential(
            nn.Conv2d(w, w // 2, 1, bias=False), nn.BatchNorm2d(w // 2), nn.ReLU()
        )
        self.right = nn.Sequential(
            nn.Conv2d(w, w // 2, 1, bias=False), nn.BatchNorm2d(w // 2), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(w * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        x = x + self.relu_a(self.bn_a(self.conv_a(x)))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        return self.fc(torch.flatten(self.pool(x), 1))


def small_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    return SmallCNN(num_classes, width)


class Branchy(nn.Module):
    """Data-dependent control flow: FX cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.gate = Gate()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # depends on the data
            return torch.relu(x)
        return x


def not_a_model(num_classes: int = 10) -> str:
    return "a string"
