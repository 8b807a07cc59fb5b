"""INT8 quantization-aware training for integer-arithmetic-only inference (Jacob et al., 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference"), the scheme TFLite / ONNX Runtime / PyTorch's QNNPACK and FBGEMM run:

- weights: symmetric, per output channel, int8 in [-127, 127]: w_q = scale_c * round(w / scale_c),
  scale_c = max|w_c| / 127 (no zero point, -128 unused so that negation stays in range);
  straight-through gradient (nothing is clipped: the range is the channel's own max).
- activations: asymmetric, per tensor, uint8 in [0, 255] with a zero point, on the range of an
  exponential-moving-average observer of the min / max (updated in training mode only; eval
  uses the frozen range). The range is widened to contain 0, and 0.0 maps to the integer zero
  point exactly (zero padding and ReLU zeros are exact). Straight-through gradient inside the
  representable range, zero outside it (the clipped values).
- batch norm: trained as conv -> BN with batch statistics, then frozen after
  `quant.freeze_bn_epoch` epochs (`bn_freeze_hook`): running statistics, no updates.

Batch-norm folding. The paper quantizes the folded weight w * gamma / sigma. With per-channel
symmetric weights this needs no separate code path: for any per-channel factor s_c,
Q(s_c * w_c) = s_c * Q(w_c) exactly (the scale is max|s_c w_c| / 127 = |s_c| scale_c and round
is odd), so after the freeze, when sigma is the fixed running statistic, conv(x, Q(w)) followed
by the frozen BN computes exactly conv(x, Q(w * gamma / sigma)) + (beta - gamma * mean / sigma):
the paper's folded forward, with the BN's scale folded into the weight's int8 scale
(`fold_bn_weight` checks it; compress.fuse bakes it for deployment, Q(w) * s_c being the int8
weight times the scale s_c * scale_c). Keeping conv and BN apart keeps checkpoints, `fuse.py` and
pruning unchanged, and a rebuilt model computes bit for bit what the trained one did.

The pure functions come first; `Int8Weight` / `Int8Act` wrap them as quantizers, built by
compress.quant.quantizers for kind=int8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from compress.quant import primitives as P
from compress.quant.base import Quantizer

W_QMAX = 127  # int8 weights in [-127, 127]
A_QMIN, A_QMAX = 0, 255  # uint8 activations
MOMENTUM = 0.01  # EMA observer: new = (1 - m) * old + m * batch
_TINY = 1e-8  # smallest scale: an all-zero channel / range quantizes to 0, never to NaN


# ---------------------------------------------------------------- pure functions
def _per_channel(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v.view(-1, *([1] * (dim - 1)))


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per output channel (dim 0): max|w_c| / 127, shape (C,)."""
    return (w.detach().abs().reshape(w.shape[0], -1).amax(1) / W_QMAX).clamp_min(_TINY)


def int8_weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in [-127, 127], fp32 scale per output channel): w ~ codes * scale."""
    scale = weight_scale(w).float()
    codes = torch.round(w.detach().float() / _per_channel(scale, w.dim()))
    return codes.clamp_(-W_QMAX, W_QMAX).to(torch.int8), scale


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-channel int8 fake quantization: scale_c * codes, identity gradient."""
    codes, scale = int8_weight_codes(w)
    q = codes.float() * _per_channel(scale, w.dim())
    return P.ste(w, q.to(w.dtype))


def fold_bn_weight(w: torch.Tensor, bn: _BatchNorm) -> torch.Tensor:
    """The paper's folded weight w * gamma / sqrt(running_var + eps) (per output channel)."""
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return w * _per_channel(s, w.dim())


def act_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of uint8 over [lo, hi] widened to contain 0; the zero point is an
    integer in [0, 255], so 0.0 is represented exactly. Tensors throughout (no host sync)."""
    lo = lo.detach().float().clamp_max(0.0)
    hi = hi.detach().float().clamp_min(0.0)
    scale = ((hi - lo) / (A_QMAX - A_QMIN)).clamp_min(_TINY)
    zero_point = (A_QMIN - torch.round(lo / scale)).clamp(A_QMIN, A_QMAX)
    return scale, zero_point


class _MaskedSTE(torch.autograd.Function):
    """`q` forward; backward passes the gradient where `inside` (a bool mask), zero elsewhere."""

    @staticmethod
    def forward(ctx, x, q, inside):  # type: ignore[override]
        ctx.save_for_backward(inside)
        return q

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quant_affine(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """Asymmetric uint8 fake quantization: (clamp(round(x / scale) + zp, 0, 255) - zp) * scale,
    computed in fp32. Gradient 1 where x is inside the representable range, 0 where clipped."""
    xd = x.detach().float()
    level = torch.round(xd / scale) + zero_point
    inside = (level >= A_QMIN) & (level <= A_QMAX)
    q = (level.clamp_(A_QMIN, A_QMAX) - zero_point) * scale
    return _MaskedSTE.apply(x, q.to(x.dtype), inside)


def act_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of `x` (what an integer-only kernel reads)."""
    level = torch.round(x.detach().float() / scale) + zero_point
    return level.clamp_(A_QMIN, A_QMAX).to(torch.uint8)


def ema(old: torch.Tensor, new: torch.Tensor, momentum: float) -> torch.Tensor:
    return old * (1 - momentum) + new * momentum


# ---------------------------------------------------------------- quantizers
class Int8Weight(Quantizer):
    """Symmetric per-output-channel int8 weights (one fp32 scale per channel)."""

    kind, bits, scaled = "int8", 8, True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return int8_weight(w)


class Int8Act(Quantizer):
    """ReLU (ReLU6 at a ReLU6 site), then asymmetric per-tensor uint8 on an EMA min / max.

    Buffers (in every checkpoint): `min_val`, `max_val` (the observed range) and
    `initialized` (false until the first training batch, which sets the range; EMA after
    that). Before any training batch the range is [0, 6] (ReLU6's), so an untrained model
    still computes a quantized activation."""

    kind, bits = "int8", 8

    def __init__(self, momentum: float = MOMENTUM, relu: bool = True) -> None:
        super().__init__()
        self.momentum = momentum
        # False at a layer input (compress.quant.sites): the observed range, negatives too
        self.relu = relu
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(6.0))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """EMA update of the range from one batch (no host sync: `where`, not `if`)."""
        lo, hi = torch.aminmax(x.detach().float())
        init = self.initialized
        self.min_val.copy_(torch.where(init, ema(self.min_val, lo, self.momentum), lo))
        self.max_val.copy_(torch.where(init, ema(self.max_val, hi, self.momentum), hi))
        self.initialized.fill_(True)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return act_qparams(self.min_val, self.max_val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # quantize_ sets float_type at a ReLU / ReLU6 module site; an Activation slot is a ReLU
        if getattr(self, "float_type", None) is nn.ReLU6:
            x = x.clamp(0, 6)
        elif self.relu:
            x = torch.relu(x)
        if self.training:
            self.observe(x)
        return fake_quant_affine(x, *self.qparams())

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}" + ("" if self.relu else ", relu=False")


# ---------------------------------------------------------------- batch-norm freeze
def _stay_in_eval(bn: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a frozen BN: model.train() at each epoch cannot unfreeze it."""
    bn.train(False)


def freeze_bn_(model: nn.Module) -> int:
    """Freeze every BatchNorm of `model`: running statistics in training too, momentum 0, no
    further updates. Idempotent; returns how many BNs were newly frozen."""
    count = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not getattr(m, "bn_frozen", False):
            m.momentum = 0.0
            m.train(False)
            m.register_forward_pre_hook(_stay_in_eval)
            m.bn_frozen = True
            count += 1
    return count


def bn_freeze_hook(model: nn.Module, epoch: int) -> Callable[..., bool]:
    """A hook for the end of each epoch: `hook(done, model=None)` freezes the BNs once `done`
    (epochs completed) reaches `epoch`, so epochs 1..epoch learn BN statistics and the later
    ones use them frozen. Returns whether the BNs are frozen. Call it with the epoch a resumed
    run starts from as well (frozen from its first step when it is past the freeze)."""

    def hook(done: int, net: nn.Module | None = None) -> bool:
        if done < epoch:
            return False
        freeze_bn_(net if net is not None else model)
        return True

    return hook
