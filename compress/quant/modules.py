"""QConv2d / QLinear: conv and linear layers whose weight passes through a quantizer.

They share their Parameters with the float layer they come from (`from_float`), and their
state_dict has the same keys, so float and quantized checkpoints are interchangeable (but for
the state of a weight quantizer that has one: LSQ's `weight_quant.step` / `.initialized`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.quantizers import FP32Weight, Quantizer


class _QMixin:
    weight: nn.Parameter
    weight_quant: Quantizer

    @property
    def weight_bits(self) -> int:
        return self.weight_quant.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quant(self.weight)

    def with_float_weight(self) -> nn.Module:
        """This layer with a float weight (BN folded into it): a plain conv / linear layer, or,
        where it has an input quantizer, itself with an fp32 weight quantizer, so that its
        input stays quantized."""
        if self._modules.get("input_quant") is None:  # type: ignore[attr-defined]
            return self.to_float()  # type: ignore[attr-defined]
        self.weight_quant = FP32Weight()
        return self  # type: ignore[return-value]

    def read_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` through the layer's input quantizer, where quant.act.sites=inputs put one
        (compress.quant.sites; possibly shared with the other readers of the same tensor)."""
        q = self._modules.get("input_quant")  # type: ignore[attr-defined]
        return x if q is None else q(x)

    def storage_bytes(self) -> int:
        """Weight bits at the quantized width, plus one fp32 scale per output channel if scaled."""
        scales = self.weight.shape[0] * 4 if self.weight_quant.scaled else 0
        return math.ceil(self.weight.numel() * self.weight_bits / 8) + scales


class QConv2d(_QMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.read_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: Quantizer | None = None) -> QConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        q.weight, q.bias = conv.weight, conv.bias
        q.weight_quant = weight_quant or FP32Weight()
        q.weight_quant.attach_(q.weight)
        q.train(conv.training)
        return q

    def to_float(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device="meta",
        )
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv


class QLinear(_QMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.read_input(x), self.quantized_weight(), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: Quantizer | None = None) -> QLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        q.weight, q.bias = linear.weight, linear.bias
        q.weight_quant = weight_quant or FP32Weight()
        q.weight_quant.attach_(q.weight)
        q.train(linear.training)
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        lin.train(self.training)
        return lin
