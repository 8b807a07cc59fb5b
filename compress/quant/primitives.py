"""Pure quantization functions with defined gradients. Everything here is stateless math.

Gradient modes of `with_surrogate_grad` (the backward of a quantizer whose input range is
[lo, hi], centre c = (lo + hi) / 2, half-width h = (hi - lo) / 2, output span s):
  ste           d/dx = 1 everywhere (pass-through)
  saturate_ste  d/dx = 1 where lo <= x <= hi, 0 outside (for sign: |x| <= 1)
  soft_ste      d/dx = (s / h) * max(0, 1 - |x - c| / h), the derivative of a piecewise-
                quadratic approximation of the step (for sign: 2 - 2|x| inside [-1, 1], the
                ApproxSign of Bi-Real Net); it integrates to the output span s.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from compress.config import GRAD_MODES


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`q` forward (exactly: q + 0), identity gradient to `x` backward."""
    return q.detach() + (x - x.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return ste(x, torch.round(x))


def quantize_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's q_k on [0, 1]: round((2^k - 1) x) / (2^k - 1), straight-through round."""
    n = float(2**bits - 1)
    return round_ste(x * n) / n


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so every value is +-1 (no gradient; see with_surrogate_grad).

    copysign is a vectorized elementwise kernel; `where` on a bool mask is ~10x slower on CPU.
    Adding +0.0 turns -0.0 into +0.0, so both zeros map to +1. The ONNX exporters have no
    copysign (nor signbit): while exporting, the same values come from `where`."""
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return torch.where(x >= 0, one, -one)
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x + 0.0)


def _outside(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """The neighbours of lo and hi in `dtype` just outside [lo, hi]: hardtanh_backward passes
    the gradient on the open interval, so widening by one ulp makes it the closed [lo, hi].
    A subnormal neighbour (beside 0) becomes the smallest normal number, so that it survives
    flush-to-zero modes."""
    t = torch.tensor([lo, hi], dtype=dtype)
    out = torch.nextafter(t, torch.tensor([-math.inf, math.inf], dtype=dtype))
    tiny = torch.finfo(dtype).tiny
    return tuple(  # type: ignore[return-value]
        math.copysign(tiny, v) if 0 < abs(v) < tiny else v for v in out.tolist()
    )


_open_bounds = functools.lru_cache(maxsize=64)(_outside)  # fixed bounds: computed once


def surrogate_grad(x: torch.Tensor, mode: str, lo: float, hi: float, span: float) -> torch.Tensor:
    """The backward multiplier d q(x) / dx of a gradient mode (see the module docstring)."""
    if mode == "ste":
        return torch.ones_like(x)
    if mode == "saturate_ste":
        return ((x >= lo) & (x <= hi)).to(x.dtype)
    if mode == "soft_ste":
        c, h = (lo + hi) / 2, (hi - lo) / 2
        return (span / h) * (1 - (x - c).abs() / h).clamp_min(0)
    raise ValueError(f"unknown gradient mode {mode!r}: expected one of {', '.join(GRAD_MODES)}")


class _SurrogateGrad(torch.autograd.Function):
    """Saves only what the backward needs: nothing (ste), x (saturate_ste, whose backward is one
    fused hardtanh_backward pass; a bool mask costs two passes forward and a slow masked_fill
    backward on CPU), or the multiplier itself (soft_ste)."""

    @staticmethod
    def forward(ctx, x, q, mode, lo, hi, span):  # type: ignore[override]
        ctx.mode = mode
        if mode == "saturate_ste":
            ctx.bounds = _open_bounds(lo, hi, x.dtype)
            ctx.save_for_backward(x)
        elif mode == "soft_ste":
            ctx.save_for_backward(surrogate_grad(x, mode, lo, hi, span))
        elif mode != "ste":
            surrogate_grad(x, mode, lo, hi, span)  # raises: unknown mode
        return q

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.mode == "ste":
            out = grad
        elif ctx.mode == "saturate_ste":
            (x,) = ctx.saved_tensors
            out = torch.ops.aten.hardtanh_backward(grad, x, *ctx.bounds)
        else:
            out = grad * ctx.saved_tensors[0]
        return out, None, None, None, None, None


def with_surrogate_grad(
    x: torch.Tensor, q: torch.Tensor, mode: str, lo: float, hi: float, span: float
) -> torch.Tensor:
    """Return `q` (the quantized x) in forward, with the gradient of mode `mode` in backward."""
    return _SurrogateGrad.apply(x, q.detach(), mode, lo, hi, span)


# ---------------------------------------------------------------- weights
def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w_q = 2 q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1 (DoReFa-Net), gradient through tanh."""
    t = torch.tanh(w)
    t = t / (2 * t.abs().max().detach().clamp_min(1e-12)) + 0.5
    return 2 * quantize_k(t, bits) - 1


def _per_channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first (output channels), shaped to broadcast against x."""
    return x.reshape(x.shape[0], -1).mean(1).view(-1, *([1] * (x.dim() - 1)))


def ternary_weight(w: torch.Tensor, gap: float = 0.7, scale: bool = True) -> torch.Tensor:
    """TWN: per output channel, delta = gap * mean|w|; values {-a, 0, +a} with a = mean of |w|
    over |w| > delta (a = 1 without `scale`). Straight-through gradient."""
    a = w.abs().detach()
    delta = gap * _per_channel_mean(a)
    mask = (a > delta).to(w.dtype)
    q = torch.sign(w.detach()) * mask
    if scale:
        count = mask.reshape(w.shape[0], -1).sum(1).clamp_min(1)
        alpha = (a * mask).reshape(w.shape[0], -1).sum(1) / count
        q = q * alpha.view(-1, *([1] * (w.dim() - 1)))
    return ste(w, q)


def binary_weight(w: torch.Tensor, scale: bool = True, center: bool = False) -> torch.Tensor:
    """BNN / XNOR-Net: sign(w) (sign(0) = +1), times alpha = mean|w| per output channel with
    `scale`; `center` subtracts the per-channel mean first. Straight-through gradient."""
    if center:
        w = w - _per_channel_mean(w)
    q = sign(w.detach())
    if scale:
        q = q * _per_channel_mean(w.detach().abs())
    return ste(w, q)


# ---------------------------------------------------------------- activations
def dorefa_act(x: torch.Tensor, bits: int, grad: str = "saturate_ste") -> torch.Tensor:
    """clip(x, 0, 1) quantized to 2^k levels."""
    n = float(2**bits - 1)
    xd = x.detach()
    xd = xd.float() if n > torch.finfo(xd.dtype).max / 2 else xd  # 2^16 levels overflow fp16
    q = xd.clamp(0, 1).mul_(n).round_().div_(n)  # in place: one buffer, not four
    return with_surrogate_grad(x, q.to(x.dtype), grad, 0.0, 1.0, 1.0)


def _dense_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in one read-only pass: tensors with the same dense layout (NCHW or NHWC) are
    dotted as flat memory, since the sum does not depend on element order."""
    dense = a.is_contiguous() or a.is_contiguous(memory_format=torch.channels_last)
    if a.dim() == 4 and dense and a.stride() == b.stride():
        n = a.numel()
        return torch.dot(a.as_strided((n,), (1,)), b.as_strided((n,), (1,)))
    return (a * b).sum()


class _PACT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, bits):  # type: ignore[override]
        n = float(2**bits - 1)
        # fp16 / bf16 (autocast) are quantized in fp32: n / alpha overflows fp16 at 16 bits,
        # and bf16 cannot hold 2^8 levels of a range exactly
        xd = x.detach() if x.dtype == torch.float32 else x.detach().float()
        a = alpha.detach().float().clamp_min(1e-4)
        q = torch.clamp(xd, torch.zeros_like(a), a).mul_(n / a).round_().mul_(a / n)
        ctx.save_for_backward(x, q, a)
        ctx.alpha_dtype = alpha.dtype
        return q.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, q, a = ctx.saved_tensors
        gx, galpha = pact_grads(grad, x, q, a, on_host=x.device.type == "cpu")
        return gx.to(x.dtype), galpha.reshape(()).to(ctx.alpha_dtype), None


def pact_grads(
    grad: torch.Tensor, x: torch.Tensor, q: torch.Tensor, a: torch.Tensor, on_host: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """PACT's gradients (d/dx, d/dalpha), in fp32 like the forward: alpha is rarely a bf16 /
    fp16 value, and x's dtype would round the bound, moving values across it.

    on_host (CPU): alpha read as a Python float, so the fused hardtanh / threshold backward
    kernels take scalar bounds. On an accelerator that read is a host-device sync per layer
    per step, so the bounds stay tensors there (no sync; the same values)."""
    x, g = x.detach().float(), grad.float()
    if on_host:
        hi = float(a)
        gx = torch.ops.aten.hardtanh_backward(g, x, *_outside(0.0, hi, torch.float32))
        above = torch.ops.aten.threshold_backward(g, x, hi).sum()
    else:
        gx = g * ((x >= 0) & (x <= a)).to(g.dtype)
        above = (g * (x > a).to(g.dtype)).sum()
    # dq/dalpha: (q - x) / alpha inside [0, alpha] (the rounding error, as LSQ), 1 above;
    # from the difference itself (two large dots would cancel)
    inside = _dense_dot(gx, q - x) / a
    return gx, inside + above


def pact_act(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT (Choi et al., 2018): clip(x, 0, alpha) quantized to 2^k levels, alpha learned.

    d/dx = 1 on [0, alpha] (saturating STE). d/dalpha = 1 where x > alpha, and (q - x) / alpha
    inside, the derivative of the rounding error with a straight-through round (as in LSQ,
    Esser et al., 2020): without it alpha only feels the clipped values and barely moves.
    DoReFa's fixed [0, 1] range is a ReLU1 that cuts every larger activation; a learned range
    keeps them."""
    return _PACT.apply(x, alpha, bits)


def ternary_act(
    x: torch.Tensor, threshold: float = 0.5, grad: str = "saturate_ste"
) -> torch.Tensor:
    """{-1, 0, +1}: sign(x) where |x| > threshold, else 0."""
    q = torch.sign(F.hardshrink(x.detach(), threshold))
    return with_surrogate_grad(x, q, grad, -1.0, 1.0, 2.0)


def binary_act(x: torch.Tensor, grad: str = "saturate_ste") -> torch.Tensor:
    """sign(x) with sign(0) = +1."""
    return with_surrogate_grad(x, sign(x.detach()), grad, -1.0, 1.0, 2.0)
