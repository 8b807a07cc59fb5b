"""QConv2d / QLinear (compress.quant.modules): what they store, and the float layers they
come from and go back to."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress.quant import QConv2d, QLinear
from compress.quant.quantizers import BinaryWeight, DoReFaWeight, LSQWeight, TernaryWeight


@pytest.mark.parametrize(
    ("quantizer", "expected"),
    [
        # 5 x 3 x 1 x 1 weights: 15 values; a scaled kind adds one fp32 scale per output channel
        (BinaryWeight(), math.ceil(15 * 1 / 8) + 5 * 4),  # 2 + 20
        (TernaryWeight(), math.ceil(15 * 2 / 8) + 5 * 4),  # 4 + 20
        (DoReFaWeight(3), math.ceil(15 * 3 / 8)),  # 6, no scales
        (LSQWeight(4), math.ceil(15 * 4 / 8) + 5 * 4),  # 8 + 20
    ],
)
def test_storage_is_the_packed_bits_plus_one_scale_per_output_channel(quantizer, expected):
    conv = QConv2d.from_float(nn.Conv2d(3, 5, 1, bias=False), quantizer)
    assert conv.storage_bytes() == expected
    lin = QLinear.from_float(nn.Linear(3, 5, bias=False), quantizer)
    assert lin.storage_bytes() == expected


@pytest.mark.parametrize("bias", [True, False])
def test_from_float_and_back_keep_the_bias_or_its_absence(bias):
    conv, lin = nn.Conv2d(3, 4, 3, bias=bias), nn.Linear(3, 4, bias=bias)
    for layer, q in ((conv, QConv2d.from_float(conv)), (lin, QLinear.from_float(lin))):
        assert (q.bias is None) is (not bias) and q.bias is layer.bias
        back = q.to_float()
        assert (back.bias is None) is (not bias) and back.weight is layer.weight
        assert set(back.state_dict()) == set(layer.state_dict())
        x = torch.randn(2, 3, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3)
        assert torch.equal(back(x), layer(x))
