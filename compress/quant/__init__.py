"""Quantization-aware training: quantizers, quantized layers, and `quantize_`."""

from compress.quant.api import (
    bit_widths,
    is_quantized,
    quant_callbacks,
    quant_label,
    quantize_,
    to_float,
)
from compress.quant.modules import QConv2d, QLinear
from compress.quant.quantizers import act_quantizer, weight_quantizer

__all__ = [
    "QConv2d",
    "QLinear",
    "act_quantizer",
    "bit_widths",
    "is_quantized",
    "quant_callbacks",
    "quant_label",
    "quantize_",
    "to_float",
    "weight_quantizer",
]
