"""Sparse training for network slimming: L1 on the BN scales of prunable layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.engine import Callback
from compress.errors import check
from compress.prune.pruner import prunable_units


class BNSparsity(Callback):
    """Add s * sign(gamma) to the gradient of every prunable BN scale (the subgradient of
    s * |gamma|), and log a histogram of |gamma| each epoch."""

    def __init__(self, model: nn.Module, s: float) -> None:
        check(s > 0, "sparsity.s", s, "a penalty > 0")
        self.s = s
        self.scales = [u.bn.weight for u in prunable_units(model)]

    def after_backward(self, model: nn.Module) -> None:
        with torch.no_grad():
            for g in self.scales:
                if g.grad is not None:
                    g.grad.add_(torch.sign(g), alpha=self.s)

    def on_epoch_end(self, epoch: int, model: nn.Module, writer: Any) -> None:
        if writer is not None:
            gammas = torch.cat([g.detach().abs().flatten() for g in self.scales])
            writer.add_histogram("bn/abs_gamma", gammas.cpu(), epoch)
            writer.add_scalar("bn/mean_abs_gamma", gammas.mean().item(), epoch)
