"""The quantizer base class, alone so that every quantizer module can import it without a cycle
(compress.quant.quantizers builds the quantizers of compress.quant.int8, which subclass it)."""

from __future__ import annotations

from torch import nn


class Quantizer(nn.Module):
    bits: int = 32
    kind: str = "fp32"
    scaled: bool = False  # stores one fp32 scale per output channel
