"""Quantization-aware training: quantizers, quantized layers, and `quantize_`."""

from compress.quant.api import (
    applied_label,
    bit_widths,
    is_quantized,
    quant_label,
    quantize_,
    register_weight_handler,
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
    "applied_label",
    "register_weight_handler",
    "quant_label",
    "quantize_",
    "to_float",
    "weight_quantizer",
]
