"""The quantizer base class, alone so that every quantizer module can import it without a cycle
(compress.quant.quantizers builds the quantizers of compress.quant.int8, which subclass it)."""

from __future__ import annotations

import torch
from torch import nn


class Quantizer(nn.Module):
    bits: int = 32
    kind: str = "fp32"
    scaled: bool = False  # stores one fp32 scale per output channel

    def attach_(self, weight: torch.Tensor) -> None:
        """Called by QConv2d / QLinear.from_float with the layer's weight, for quantizers whose
        state depends on it (LSQ's per-channel step); nothing for the others."""

    def keep_out_channels_(self, idx: torch.Tensor) -> None:
        """Keep only output channels `idx` of per-channel state (a pruner that thins the layer's
        weight calls it with the same indices); nothing for quantizers without such state."""
