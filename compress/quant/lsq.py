"""LSQ: Learned Step Size Quantization (Esser et al., 2020), as pure functions.

    v_q = round(clamp(v / s, -Q_N, Q_P)) * s

with a learned step s. The integer codes round(clamp(v / s, -Q_N, Q_P)) and the step are what
an integer kernel reads (compress.deploy.qdq: the step is the Q / DQ scale). Gradients, with
r = v / s and a straight-through round:

    d v_q / d v = 1 where -Q_N <= r <= Q_P, else 0
    d v_q / d s = round(r) - r inside, -Q_N below, Q_P above   (times g)

The step gradient is the derivative of the rounding error: it pulls s towards the value that
best balances rounding and clipping, which is what makes the step learnable. The paper scales
it by g = 1 / sqrt(N * Q_P), N the number of elements sharing the step (a weight channel's
elements for a per-channel step; features per sample, numel / batch, for activations), so that
the step's updates keep the same size relative to s as the weights' relative to w.

Bounds: activations unsigned [0, 2^b - 1] (the clamp at 0 subsumes the ReLU the quantizer
replaces) or signed [-2^(b-1), 2^(b-1) - 1]; weights signed [-2^(b-1), 2^(b-1) - 1] as in the
paper, except at 8 bits, where they are [-127, 127]: a BN fold with a negative gamma negates a
channel's codes (compress.deploy.qdq), and -(-128) does not fit int8 (the same reason
compress.quant.int8 leaves -128 unused). Below 8 bits every code and its negation fit.

Step initialisation (the paper): s = 2 mean|v| / sqrt(Q_P), per output channel for weights.
"""

from __future__ import annotations

import math

import torch

TINY = 1e-8  # smallest step: an all-zero channel quantizes to 0, never to NaN


def act_bounds(bits: int, signed: bool = False) -> tuple[int, int]:
    """(Q_N, Q_P) of b-bit activation codes: [0, 2^b - 1], or [-2^(b-1), 2^(b-1) - 1] signed."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def weight_bounds(bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) of b-bit weight codes: the paper's [-2^(b-1), 2^(b-1) - 1] below 8 bits,
    [-127, 127] at 8 (see the module docstring)."""
    if bits >= 8:
        return 127, 127
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def grad_scale(n: int, qp: int) -> float:
    """The paper's step-gradient scale g = 1 / sqrt(N * Q_P)."""
    return 1.0 / math.sqrt(max(1, n) * qp)


def _compute_dtype(v: torch.Tensor) -> torch.dtype:
    """fp32 for fp32 / fp16 / bf16 (autocast) inputs, fp64 for fp64."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _broadcast(s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A per-channel step (C,) viewed to broadcast over dim 0 of v; a scalar step as it is."""
    return s.view(-1, *([1] * (v.dim() - 1))) if s.dim() == 1 else s


def _step(s: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _broadcast(s.detach().to(dtype).clamp_min(TINY), v)


def init_step(v: torch.Tensor, qp: int, per_channel: bool) -> torch.Tensor:
    """The paper's initial step 2 mean|v| / sqrt(Q_P): shape (C,) per output channel (dim 0),
    else a scalar. At least TINY."""
    a = v.detach().to(_compute_dtype(v)).abs()
    mean = a.reshape(a.shape[0], -1).mean(1) if per_channel else a.mean()
    return (2 * mean / math.sqrt(qp)).clamp_min(TINY).float()


def init_act_step(x: torch.Tensor, qp: int, signed: bool) -> torch.Tensor:
    """The initial activation step from a batch. Unsigned, from what the quantizer passes
    (x >= 0: the output of the ReLU it replaces, which is what the paper's quantizer sees);
    a batch with no positive value falls back to mean|x|. A scalar, at least TINY."""
    if signed:
        return init_step(x, qp, per_channel=False)
    relu = init_step(x.detach().clamp_min(0), qp, per_channel=False)
    return torch.where(relu > TINY, relu, init_step(x, qp, per_channel=False))


def codes(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """The integer codes round(clamp(v / s, -Q_N, Q_P)) (float dtype, integer values)."""
    dtype = _compute_dtype(v)
    return (v.detach().to(dtype) / _step(s, v, dtype)).clamp_(-qn, qp).round_()


class _LSQ(torch.autograd.Function):
    """Saves v and s only: the backward recomputes v / s (one division) rather than keeping an
    fp32 copy of the ratio and a mask alive until the backward pass."""

    @staticmethod
    def forward(ctx, v, s, qn, qp, g):  # type: ignore[override]
        dtype = _compute_dtype(v)
        step = _step(s, v, dtype)
        q = (v.detach().to(dtype) / step).clamp_(-qn, qp).round_().mul_(step)
        ctx.save_for_backward(v, s)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return q.to(v.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, s = ctx.saved_tensors
        gv, gs = lsq_grads(grad, v, s, ctx.qn, ctx.qp, ctx.g)
        return gv, gs, None, None, None


def lsq_grads(
    grad: torch.Tensor, v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dv, d/ds) of `lsq_quantize` for the incoming gradient `grad` (see the module
    docstring); d/ds has the shape of s (one value per channel for a per-channel step)."""
    dtype = _compute_dtype(v)
    r = v.detach().to(dtype) / _step(s, v, dtype)
    gr = grad.to(dtype)
    inside = (r >= -qn) & (r <= qp)
    gv = torch.where(inside, gr, torch.zeros((), dtype=dtype, device=gr.device))
    dqds = torch.where(inside, torch.round(r) - r, torch.where(r < -qn, -float(qn), float(qp)))
    prod = gr * dqds
    gs = prod.reshape(prod.shape[0], -1).sum(1) if s.dim() == 1 else prod.sum()
    return gv.to(v.dtype), (gs * g).reshape(s.shape).to(s.dtype)


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """round(clamp(v / s, -qn, qp)) * s with LSQ's gradients to v and to s (scaled by g).

    s: a scalar step, or one step per output channel (shape (C,), along dim 0 of v). Computed
    in fp32 (fp64 for fp64 input), returned in v's dtype; s is used clamped to >= TINY."""
    return _LSQ.apply(v, s, qn, qp, g)
