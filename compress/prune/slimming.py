"""Sparse training for network slimming: L1 on the BN scales of prunable channels.

Pure functions: the training loop calls `regularize_bn_` after each backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compress.config import validate_sparsity
from compress.detection.models import core_of
from compress.prune.pruner import channel_graph


def slimming_scales(model: nn.Module, image_shape: Sequence[int]) -> list[nn.Parameter]:
    """The BN scales (gamma) that rank the model's prunable channels."""
    graph = channel_graph(model, image_shape)
    core = core_of(model)  # a detector's: the graph's names are its core's
    return [core.get_submodule(bn).weight for bn in graph.bn_names()]


def regularize_bn_(scales: Sequence[nn.Parameter], s: float) -> None:
    """Add s * sign(gamma) to the gradient of every scale: the subgradient of s * |gamma|."""
    validate_sparsity({"s": s})
    with torch.no_grad():
        for g in scales:
            if g.grad is not None:
                g.grad.add_(torch.sign(g), alpha=s)
