"""Model measurements: parameters, MACs per image, storage at real bit widths, latency."""

from __future__ import annotations

import math
import time

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of conv and linear layers for one image of `input_shape` (C, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]  # (in / groups) * kh * kw
        total += out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def size_bytes(model: nn.Module) -> int:
    """Bytes to store the model's parameters at their real bit widths.

    A quantized layer's weight counts at its bit width (plus its per-channel scales, if any,
    at 32 bits); every other parameter (first / last layers, BN, biases) at 32 bits.
    """
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and hasattr(module, "storage_bytes"):
                total += module.storage_bytes()
            else:
                total += math.ceil(p.numel() * 32 / 8)
    return total


def latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    reps: int = 20,
    warmup: int = 3,
    channels_last: bool = False,
) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, on the model's device);
    `channels_last` converts the model (in place) and the input to NHWC."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_shape, device=device)
    if channels_last:  # outside inference mode: the parameters must stay trainable
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            return _median_forward_ms(model, x, device, reps, warmup)
    finally:
        model.train(was_training)


def _median_forward_ms(
    model: nn.Module, x: torch.Tensor, device: torch.device, reps: int, warmup: int
) -> float:
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000 * times[len(times) // 2]
