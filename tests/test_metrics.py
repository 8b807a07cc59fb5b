from __future__ import annotations

import time

import torch
from torch import nn

from compress.metrics import count_macs, count_params, latency_ms, size_bytes
from compress.models import create_model
from compress.quant import quantize_


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8 * 3*3*3 = 216 weights
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # 8 * 2*3*3 = 144 weights
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),  # 80 weights + 10 biases
    )


def test_params_and_macs_follow_the_formulas():
    net = small_net()
    assert count_params(net) == 216 + 144 + 90
    # per output pixel: (in / groups) * kh * kw MACs per output channel; 8x8 image
    assert count_macs(net, (3, 8, 8)) == 64 * 216 + 64 * 144 + 80


def test_size_counts_quantized_weights_at_their_width():
    net = small_net()
    assert size_bytes(net) == 4 * (216 + 144 + 90)
    quantize_(net, {"weight": {"kind": "binary", "scale": False}, "keep_first_last": False})
    # binary weights at 1 bit; the linear's bias stays at 32 bits
    assert size_bytes(net) == 216 // 8 + 144 // 8 + 80 // 8 + 4 * 10


class Sleepy(nn.Module):
    """A forward pass of a known duration: 20 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.conv(x)


def test_latency_is_measured_and_channels_last_converts_the_model():
    assert 19 <= latency_ms(Sleepy(), (3, 8, 8), batch_size=1, reps=3) < 60
    model = create_model("resnet20")
    latency_ms(model, (3, 32, 32), batch_size=2, reps=3, channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training  # restored, and the converted parameters still train
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.conv1.weight.grad is not None
