"""Model measurements: parameters, MACs per image, storage at real bit widths, latency."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Formulas, in torch's convention (2 FLOPs per multiply-accumulate), for the matmul and
# attention ops eager PyTorch runs that torch.utils.flop_counter has none for (it counts those
# as 0): the flash attention kernel scaled_dot_product_attention picks on CPU, matrix-vector
# and vector products, addbmm, the fused addmm + activation and the int8 matmul.
def _mv_flop(mat: torch.Size, _vec: torch.Size, *_args, out_shape=None, **_kw) -> int:
    return 2 * mat[0] * mat[1]


def _addmv_flop(_self: torch.Size, mat: torch.Size, vec: torch.Size, *args, **kw) -> int:
    return _mv_flop(mat, vec)


def _dot_flop(a: torch.Size, _b: torch.Size, *_args, out_shape=None, **_kw) -> int:
    return 2 * a[0]


def _mm_flop(a: torch.Size, b: torch.Size, *_args, out_shape=None, **_kw) -> int:
    return 2 * a[0] * a[1] * b[1]


def _addmm_flop(_self: torch.Size, a: torch.Size, b: torch.Size, *args, **kw) -> int:
    return _mm_flop(a, b)


def _addbmm_flop(_self: torch.Size, a: torch.Size, b: torch.Size, *_args, **_kw) -> int:
    return 2 * a[0] * a[1] * a[2] * b[2]


def _cpu_sdpa_flop(
    q: torch.Size, k: torch.Size, v: torch.Size, *_args, out_shape=None, **_kw
) -> int:
    """q @ k^T and scores @ v over every query head (a grouped key / value head is broadcast;
    a causal mask is not discounted, as torch's own attention formulas)."""
    batch, heads, s_q, d_qk = q
    return 2 * batch * heads * s_q * k[-2] * (d_qk + v[-1])


_EXTRA_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten.mv: _mv_flop,
    aten.addmv: _addmv_flop,
    aten.dot: _dot_flop,
    aten.vdot: _dot_flop,
    aten.addbmm: _addbmm_flop,
    aten._addmm_activation: _addmm_flop,
    aten._int_mm: _mm_flop,
}


@contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """nn.MultiheadAttention / TransformerEncoderLayer in eval mode may run one fused native
    op that the flop counter cannot see into; the regular path runs linear and attention ops."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one image of `input_shape` (C, H, W), eval
    mode: every matmul, linear, convolution (grouped, depthwise, transposed) and attention
    op, as torch.utils.flop_counter counts them (its FLOPs / 2; bias adds, norms, activations
    and pooling are not counted). Counting ops, not nn.Conv2d / nn.Linear modules, also sees
    functional calls (x @ w, F.linear, scaled_dot_product_attention). A module whose work
    runs outside the dispatcher (a custom C++ kernel: compress.deploy.xnor) reports it with
    an `opaque_macs(x) -> int` method, called on its input."""
    opaque = 0

    def opaque_hook(m: nn.Module, inp: tuple, _out: object) -> None:
        nonlocal opaque
        opaque += int(m.opaque_macs(inp[0]))

    hooks = [
        m.register_forward_hook(opaque_hook)
        for m in model.modules()
        if callable(getattr(m, "opaque_macs", None))
    ]
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=_device(model))
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    try:
        with _no_mha_fastpath(), counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return counter.get_total_flops() // 2 + opaque


def _device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def _hook_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The counter count_macs replaced (forward hooks on nn.Conv2d and nn.Linear only), kept as
    the reference it must equal on models whose MACs all sit in such layers."""
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
