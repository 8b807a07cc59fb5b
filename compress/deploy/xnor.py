"""Binary convolutions that really run on bits: XNOR + popcount on packed weights and
activations, a C++ CPU extension (compress/deploy/binary_conv.cpp) built on first use.

For a conv whose input is +-1 (a BinaryAct precedes it, `bacp` order) and whose weight is
binary (sign, times a per-output-channel scale with `scale`),

    dot(sign a, sign w) = K - 2 * popcount(a XOR w)            (integer arithmetic)
    out = dot * scale[o] + bias[o]

where K counts only the in-bounds taps: the fake-quant conv zero-pads, so a padded position
contributes 0 (not +-1); the kernel subtracts the padded taps' weight popcounts per output
pixel. Exactness against `F.conv2d(sign(x), binary_weight, bias)`:
- unscaled weights: bit-identical (every dot is an integer below 2^24, exact in fp32, and the
  bias is added with the same single rounding);
- scaled weights: within fp32 rounding. The fake-quant conv sums K terms +-scale in fp32 (each
  partial sum rounded), the XNOR conv rounds once (dot * scale); the two agree to a few ulps of
  the partial sums (tests: rtol 1e-6 plus an atol of 1e-6 * scale * K).
A whole model can differ more than one layer does, and then the XNOR model is the exact one:
where the exact pre-activation is 0 (integer dot 0 and bias 0), the XNOR conv returns 0.0 and
the next BinaryAct gives +1, while the fp32 fake-quant conv may leave a +-1e-8 residue whose
sign flips that +1 to -1 (wbab NIN-GC in bench/deploy_speed.py: 85 such flips into the last
binary block move the logits by ~9e-3; the XNOR model is within 1e-7 of a float64 evaluation).

Design (details in the header of binary_conv.cpp): output channels in vector lanes. The weight
is packed once (pack_weight, XnorConv2d.from_qconv) as [groups, Og / 8 blocks, Kw words, 8
lanes], so one 512-bit load holds word k of 8 output channels; the kernel broadcasts a pixel's
activation word, XORs it against the weight vectors, VPOPCNTQ, VPADDQ into per (pixel, 8
channels) accumulators, K loop innermost, no horizontal reductions. A float input is signed and
bit-packed inside the same call (AVX-512 bit transpose into a zero-padded buffer); taps are
read in place when Cg is a multiple of 64, else from per-pixel bit patches (im2col on bits).
1x1 convs (stride 1, no padding, Cg a multiple of 64) put pixels in the lanes instead and
broadcast the weight words: their outputs come out NCHW-contiguous without a transpose.

The instruction set is chosen at run time: AVX-512 VPOPCNTQ where the CPU has
avx512vpopcntdq, else AVX2 (nibble-table popcount), else portable __builtin_popcountll; see
`best_isa()`. All three share the layout and are tested against each other. The library is
built without -march (per-function target attributes), so it loads on any x86-64. Threads:
at::parallel_for (torch.set_num_threads).

Whole networks (convert_binary_net_): consecutive binary layers of a fused bacp NIN / NIN-GC
pass packed sign bits (XnorBitsConv2d: the epilogue writes sign(dot * scale + bias) bits in
the next conv's layout, the channel shuffle as a permutation of the output channels, a max
pool as an OR of bits), bit-identical to convert_binary_convs_'s float-output model; only the
first binary conv reads floats (the stem's output) and only the last writes them.

The extension is compiled once with torch.utils.cpp_extension.load (g++ and ninja) into
$COMPRESS_EXT_DIR or ~/.cache/compress/torch_extensions/<name>, and reused afterwards.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.blocks import Activation, ChannelShuffle, ConvBlock
from compress.quant.modules import QConv2d
from compress.quant.quantizers import BinaryAct, BinaryWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("binary_conv.cpp")
ISAS = {"scalar": 0, "avx2": 1, "avx512_vpopcntdq": 2}
_EXT = None


class XnorBuildError(RuntimeError):
    """The extension could not be built (a compiler error in its source: a bug, not a
    machine without tools)."""


class XnorToolchainMissing(XnorBuildError):
    """This machine has no C++ compiler or no ninja: the extension cannot be built here."""


def _build_dir() -> Path:
    root = os.environ.get("COMPRESS_EXT_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "compress" / "torch_extensions"
    tag = torch.__version__.replace("+", "_").replace(".", "_")
    path = base / f"xnor_conv_torch{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def extension():
    """The compiled extension (built on first call, cached on disk and in the process)."""
    global _EXT
    if _EXT is not None:
        return _EXT
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise XnorToolchainMissing(
            f"compress.deploy.xnor needs a C++ compiler ({cxx!r} not found on PATH; "
            "install g++ or set CXX) to build its XNOR conv extension"
        )
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as e:
        raise XnorToolchainMissing(
            "compress.deploy.xnor needs ninja to build its extension: pip install ninja"
        ) from e
    try:
        _EXT = cpp_extension.load(
            name="compress_xnor_conv",
            sources=[str(SOURCE)],
            build_directory=str(_build_dir()),
            # no FMA contraction: out = float(dot) * scale, then + bias, one rounding each
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler errors come as RuntimeError / CalledProcessError
        raise XnorBuildError(f"building the XNOR conv extension failed: {e}") from e
    return _EXT


def best_isa() -> str:
    """The instruction set the kernels use on this CPU: avx512_vpopcntdq, avx2 or scalar."""
    return extension().best_isa()


def available_isas() -> list[str]:
    best = extension().detect_isa()
    return [name for name, i in ISAS.items() if i <= best]


def _isa_id(isa: str | None) -> int:
    if isa is None:
        return -1
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}: expected one of {', '.join(ISAS)}")
    return ISAS[isa]


class PackedWeight(NamedTuple):
    words: torch.Tensor  # int64 [G, ceil(Og / 8), Kw, 8]: receptive-field bits, 8 channels in lanes
    tap_popcount: torch.Tensor  # int32 [G, KH * KW, Og rounded up to 16]: popcount per tap
    in_per_group: int  # Cg
    kernel: tuple[int, int]
    groups: int
    out_channels: int


def pack_weight(w: torch.Tensor, groups: int = 1) -> PackedWeight:
    """Sign bits (bit 1 = +1, sign(0) = +1) of a [O, Cg, KH, KW] weight of a conv with `groups`
    groups, in the kernel's layout: per group, blocks of 8 output channels, word k of the 8
    channels' receptive fields contiguous (one 512-bit vector), Kw = ceil(KH KW Cg / 64) words."""
    words, pop = extension().pack_weight(w.detach().float().contiguous(), int(groups))
    kernel = (int(w.shape[2]), int(w.shape[3]))
    return PackedWeight(words, pop, int(w.shape[1]), kernel, int(groups), int(w.shape[0]))


def pack_activations(x_sign: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Sign bits of a float NCHW tensor (bit 1 = +1, sign(0) = +1) as int64
    [N, H, W, groups, ceil(C / groups / 64)]: 64 channels of a group per word."""
    return extension().pack_activations(x_sign.detach().float(), int(groups))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    # the extension takes float32 (it makes the tensor contiguous itself); no autograd there
    return t if t is None or t.dtype == torch.float32 else t.float()


def xnor_conv2d(
    x: torch.Tensor,
    packed_weight: PackedWeight,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    kernel: int | tuple[int, int] | None = None,
    isa: str | None = None,
) -> torch.Tensor:
    """F.conv2d(sign(x), sign(w) * scale[:, None, None, None], bias, stride, padding, groups)
    computed with XNOR + popcount. `x`: a float NCHW tensor (sign and bit packing are fused into
    the call) or the output of `pack_activations(x, groups)`. `packed_weight` must have been
    packed for the same `groups`. `isa` forces an instruction set (tests); default: best."""
    # kept lean (microseconds matter for small layers); the extension checks the shapes
    kh, kw = packed_weight.kernel
    if kernel is not None and _pair(kernel) != (kh, kw):
        raise ValueError(f"kernel={kernel} but the weight was packed as {packed_weight.kernel}")
    if groups != packed_weight.groups:
        raise ValueError(f"groups={groups} but the weight was packed for {packed_weight.groups}")
    if x.dtype != torch.int64 and x.dtype != torch.float32:
        x = x.float()
    sh, sw = (stride, stride) if isinstance(stride, int) else _pair(stride)
    ph, pw = (padding, padding) if isinstance(padding, int) else _pair(padding)
    return extension().xnor_conv2d(
        x,
        packed_weight.words,
        packed_weight.tap_popcount,
        _opt(scale),
        _opt(bias),
        packed_weight.in_per_group,
        packed_weight.out_channels,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        _isa_id(isa),
    )


def _input(x: torch.Tensor) -> torch.Tensor:
    """What the extension's convs take: packed int64 words or float32 (other floats cast)."""
    return x if x.dtype in (torch.int64, torch.float32) else x.float()


class XnorConv2d(nn.Module):
    """Inference-only binary conv on packed bits, equal to the QConv2d (BinaryWeight) it was
    made from applied to sign(x): exactly without a weight scale, within fp32 rounding with."""

    def __init__(
        self,
        packed: PackedWeight,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        groups: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        self.register_buffer("words", packed.words)
        self.register_buffer("tap_popcount", packed.tap_popcount)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        if packed.groups != groups or packed.out_channels != out_channels:
            raise ValueError("XnorConv2d: the weight was packed for other groups / channels")
        self.in_per_group, self.kernel = packed.in_per_group, packed.kernel
        self.stride, self.padding, self.groups = stride, padding, groups
        self.in_channels, self.out_channels = packed.in_per_group * groups, out_channels
        self.isa: str | None = None  # None: the best the CPU has

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(
            self.words,
            self.tap_popcount,
            self.in_per_group,
            self.kernel,
            self.groups,
            self.out_channels,
        )

    @classmethod
    @torch.no_grad()
    def from_qconv(cls, qconv: QConv2d) -> XnorConv2d:
        """Pack a QConv2d with a BinaryWeight quantizer once (sign bits + per-channel scale)."""
        if not isinstance(qconv, QConv2d) or not isinstance(qconv.weight_quant, BinaryWeight):
            raise TypeError("XnorConv2d.from_qconv needs a QConv2d with a BinaryWeight quantizer")
        if isinstance(qconv.padding, str) or qconv.padding_mode != "zeros":
            raise ValueError("XnorConv2d: only explicit zero padding is supported")
        if tuple(qconv.dilation) != (1, 1):
            raise ValueError("XnorConv2d: dilation is not supported")
        q = qconv.quantized_weight().detach().float()
        # every element of a channel is +-scale: |q| is the scale exactly
        scale = q.abs().amax(dim=(1, 2, 3)).contiguous() if qconv.weight_quant.scaled else None
        bias = None if qconv.bias is None else qconv.bias.detach().float().clone()
        return cls(
            pack_weight(q, qconv.groups),
            scale,
            bias,
            _pair(qconv.stride),
            _pair(qconv.padding),
            qconv.groups,
            qconv.out_channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # straight to the extension (it checks shapes): the Python wrapper costs microseconds,
        # which matter for small layers
        return extension().xnor_conv2d(_input(x), *self._layer_args())

    def opaque_macs(self, x: torch.Tensor) -> int:
        """The multiply-accumulates of this call on `x` (float NCHW or packed [N, H, W, G, Wg]):
        the conv it replaced. compress.metrics.count_macs asks, as torch's flop counter does
        not see into the extension."""
        h, w = (x.shape[1], x.shape[2]) if x.dtype == torch.int64 else x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        pixels = ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
        return x.shape[0] * pixels * self.out_channels * self.in_per_group * kh * kw

    def _layer_args(self) -> tuple:
        """The layer's arguments to the extension's convs, after the input."""
        return (
            self.words,
            self.tap_popcount,
            self.scale,
            self.bias,
            self.in_per_group,
            self.out_channels,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
            self.padding[0],
            self.padding[1],
            _isa_id(self.isa),
        )

    def extra_repr(self) -> str:
        k = self.kernel
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={k}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, scaled={self.scale is not None}"
        )


def reference_conv(qconv: QConv2d, x: torch.Tensor) -> torch.Tensor:
    """What XnorConv2d.from_qconv(qconv) must return: the fake-quant conv of sign(x)."""
    xs = torch.copysign(torch.ones((), dtype=x.dtype), x + 0.0)
    return F.conv2d(
        xs,
        qconv.quantized_weight(),
        qconv.bias,
        qconv.stride,
        qconv.padding,
        qconv.dilation,
        qconv.groups,
    )


def binary_conv_names(model: nn.Module) -> list[str]:
    """The QConv2d layers with binary weights whose input comes from a BinaryAct: the convs of
    ConvBlocks in `bacp` order (BN -> BinaryAct -> [shuffle] -> conv)."""
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, ConvBlock) or m.order != "bacp":
            continue
        act = getattr(m.act, "fn", m.act)
        conv = m.conv
        binary = isinstance(conv, QConv2d) and isinstance(conv.weight_quant, BinaryWeight)
        if isinstance(act, BinaryAct) and binary:
            names.append(f"{name}.conv" if name else "conv")
    return names


def convert_binary_convs_(model: nn.Module) -> list[str]:
    """Replace (in place) every binary conv fed by a BinaryAct with an XnorConv2d; returns the
    names replaced. For inference: call after model.eval() (and BN fusion, if any)."""
    names = binary_conv_names(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, XnorConv2d.from_qconv(getattr(owner, child)))
        # the XNOR conv takes the sign of its float input while packing it (sign(0) = +1, as
        # BinaryAct's), so the block's own sign pass is redundant: sign(sign(x)) = sign(x)
        if isinstance(owner.act, Activation):
            owner.act.fn = nn.Identity()
    return names


# ---------------------------------------------------------------- packed binary network
class XnorBitsConv2d(XnorConv2d):
    """An XnorConv2d whose output is not float but the packed sign bits the NEXT binary conv
    reads: int64 [N, H', W', out_groups, ceil(Cout / out_groups / 64)], bit = (dot * scale +
    bias >= 0) of exactly the fp32 value XnorConv2d would return (sign(+-0) = +1), output
    channel c at channel perm[c] (a channel shuffle before the next conv), optionally
    max-pooled in bit space (OR: sign is monotone, so sign(maxpool(y)) = maxpool(sign(y)))."""

    def __init__(
        self,
        conv: XnorConv2d,
        perm: torch.Tensor | None,
        out_groups: int,
        pool: tuple[int, int, int] | None,
    ) -> None:
        super().__init__(
            conv.packed,
            conv.scale,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.groups,
            conv.out_channels,
        )
        self.isa = conv.isa
        empty = torch.empty(0, dtype=torch.int64)
        self.register_buffer("perm", empty if perm is None else perm.to(torch.int64).contiguous())
        if self.out_channels % out_groups:
            raise ValueError("XnorBitsConv2d: out_groups must divide the output channels")
        self.out_groups = int(out_groups)
        self.pool = pool or (0, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return extension().xnor_conv2d_bits(
            _input(x),
            *self._layer_args(),
            self.perm,
            self.out_groups,
            *self.pool,
        )

    def extra_repr(self) -> str:
        k, s, p = self.pool
        pool = f", maxpool=({k}, {s}, {p})" if k else ""
        shuffled = ", shuffled" if self.perm.numel() else ""
        return f"{super().extra_repr()} -> bits, out_groups={self.out_groups}{pool}{shuffled}"


class UnpackBits(nn.Module):
    """Packed sign bits [N, H, W, G, Wg] -> the float +-1 NCHW tensor sign(x) they encode
    (channels_last memory with `channels_last`)."""

    def __init__(self, channels: int, channels_last: bool = False) -> None:
        super().__init__()
        self.channels = int(channels)
        self.channels_last = bool(channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return extension().unpack_bits(x, self.channels, self.channels_last)

    def extra_repr(self) -> str:
        return f"{self.channels}, channels_last={self.channels_last}"


def maxpool_bits(x: torch.Tensor, kernel: int, stride: int, padding: int = 0) -> torch.Tensor:
    """Max pool of packed +-1 activations (OR of bits; padding counts as -1)."""
    return extension().maxpool_bits(x, int(kernel), int(stride), int(padding))


def unpack_bits(x: torch.Tensor, channels: int, channels_last: bool = False) -> torch.Tensor:
    """The float +-1 NCHW tensor (channels_last memory if asked) of packed sign bits."""
    return extension().unpack_bits(x, int(channels), bool(channels_last))


def shuffle_permutation(channels: int, groups: int) -> torch.Tensor:
    """perm[c] = the channel that ChannelShuffle(groups) moves channel c to."""
    per = channels // groups
    c = torch.arange(channels)
    return (c % per) * groups + c // per


def _square(v) -> int | None:
    if isinstance(v, int):
        return v
    v = tuple(v)
    return int(v[0]) if len(v) == 2 and v[0] == v[1] else None


def _bit_pool(m: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of a max pool that runs as an OR of bits, else None."""
    if not isinstance(m, nn.MaxPool2d) or m.ceil_mode or m.return_indices:
        return None
    k, p = _square(m.kernel_size), _square(m.padding)
    s = _square(m.stride if m.stride is not None else m.kernel_size)
    if None in (k, s, p) or _square(m.dilation) != 1:
        return None
    return k, s, p


def _skip_identity(kids: list, j: int) -> int:
    while j < len(kids) and type(kids[j][1]) is nn.Identity:
        j += 1
    return j


def _consumer(blk: nn.Module, channels: int) -> str | None:
    """How a bit output can feed block `blk`: "xnor" (its XnorConv2d reads packed bits),
    "unpack" (sign -> [shuffle] -> another conv: the bits are unpacked to +-1), or None."""
    if not isinstance(blk, ConvBlock) or blk.order != "bacp" or type(blk.bn) is not nn.Identity:
        return None
    sh = blk.shuffle
    if sh is not None and (not isinstance(sh, ChannelShuffle) or channels % sh.groups):
        return None
    act = getattr(blk.act, "fn", blk.act)
    if not isinstance(blk.act, Activation):
        return None
    if isinstance(blk.conv, XnorConv2d) and type(act) is nn.Identity:
        # convert_binary_convs_ dropped the block's sign (the XNOR conv signs while packing)
        return "xnor" if blk.conv.in_channels == channels else None
    if isinstance(act, BinaryAct) and isinstance(blk.conv, nn.Conv2d):
        return "unpack" if blk.conv.in_channels == channels else None
    return None


@torch.no_grad()
def xnor_from_float_conv(conv: nn.Conv2d) -> XnorConv2d | None:
    """An XnorConv2d for a float conv whose weights are +-t[o] (t > 0) per output channel (a
    binary conv with a BN folded into it), or None. It computes the exact integer dot times
    t[o], rounded once: within fp32 rounding of the float conv, not bit-identical to it."""
    if type(conv) is not nn.Conv2d or isinstance(conv.padding, str):
        return None
    if conv.padding_mode != "zeros" or tuple(conv.dilation) != (1, 1):
        return None
    w = conv.weight.detach().float()
    a = w.abs().flatten(1)
    t = a.amax(1)
    if not bool((t > 0).all()) or not torch.equal(a.amin(1), t):
        return None
    bias = None if conv.bias is None else conv.bias.detach().float().clone()
    return XnorConv2d(
        pack_weight(w, conv.groups),
        t.contiguous(),
        bias,
        _pair(conv.stride),
        _pair(conv.padding),
        conv.groups,
        conv.out_channels,
    )


def convert_binary_net_(
    model: nn.Module,
    channels_last: bool = False,
    example: torch.Tensor | None = None,
    xnor_scaled_convs: bool = False,
) -> list[str]:
    """The packed binary network path, in place: convert_binary_convs_, then every XNOR conv
    whose output feeds another binary block (through an optional max pool and the next block's
    channel shuffle) is made an XnorBitsConv2d: consecutive binary layers pass packed sign bits
    (shuffle and max pool applied in bit space), and a binary block whose conv is not XNOR (the
    last one of a fused bacp NIN, whose BN was folded into its weights) gets the +-1 tensor
    unpacked from the bits. Blocks that cannot be expressed (an unfused BN, another layer in
    between) keep the float-output XnorConv2d. For a fused bacp model in eval mode (NIN,
    NIN-GC: ConvBlocks in nn.Sequential containers). Returns the names of the bit-output
    convs; the result equals convert_binary_convs_'s model exactly.

    channels_last=True also runs the float conv that feeds the first XNOR conv (the stem) on
    channels_last memory, which oneDNN runs faster for its 3 input channels; the XNOR conv
    packs the NHWC output directly. That is exact only where oneDNN reduces in the same
    order for both layouts, so it is checked: the converted model must equal its NCHW self
    bit for bit on `example` (default: 8 random 32 x 32 images) and on its first image, else
    the NCHW stem is kept (a
    warning is logged). The check is on those shapes only.

    xnor_scaled_convs=True also runs a float conv fed by sign bits whose weights are +-t[o]
    per output channel (the last binary block of a fused bacp NIN: the BN before the ReLU is
    folded into its binary weights) as an XNOR conv (xnor_from_float_conv) reading the bits:
    no unpacked +-1 tensor, no fp32 conv. Its outputs are then the exact dot * t[o] rounded
    once instead of oneDNN's fp32 sum: within fp32 rounding (closer to float64), no longer
    bit-identical to the float-output model; later layers are float (no sign), so the logits
    move by fp32 rounding only."""
    convert_binary_convs_(model)
    done = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.named_children())
        for i, (name, blk) in enumerate(kids):
            if not isinstance(blk, ConvBlock) or blk.order != "bacp":
                continue
            conv = blk.conv
            if type(conv) is not XnorConv2d:
                continue
            j, pool, pool_name = _skip_identity(kids, i + 1), None, None
            if j < len(kids) and isinstance(kids[j][1], nn.MaxPool2d):
                pool, pool_name = _bit_pool(kids[j][1]), kids[j][0]
                if pool is None:
                    continue
                j = _skip_identity(kids, j + 1)
            if j >= len(kids):
                continue
            nxt = kids[j][1]
            how = _consumer(nxt, conv.out_channels)
            if how is None:
                continue
            scaled = None
            if how == "unpack" and xnor_scaled_convs:
                scaled = xnor_from_float_conv(nxt.conv)
                if scaled is not None:
                    scaled.isa = conv.isa
                    how = "xnor"
            perm = None
            if nxt.shuffle is not None:
                perm = shuffle_permutation(conv.out_channels, nxt.shuffle.groups)
                nxt.shuffle = None
            out_groups = nxt.conv.groups if how == "xnor" else 1
            blk.conv = XnorBitsConv2d(conv, perm, out_groups, pool)
            if pool_name is not None:
                setattr(seq, pool_name, nn.Identity())
            if how == "unpack":
                nxt.act = UnpackBits(conv.out_channels)
            if scaled is not None:
                nxt.act, nxt.conv = nn.Identity(), scaled
            done.append(f"{seq_name}.{name}.conv" if seq_name else f"{name}.conv")
    if channels_last and done:
        _try_channels_last_(model, example)
    return done


def _stem_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Float convs whose output goes straight (through Identity modules) to a ConvBlock whose
    XNOR conv packs it: the stem of a bacp NIN."""
    convs = []
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq.children())
        for i, blk in enumerate(kids):
            if not isinstance(blk, ConvBlock) or type(blk.conv) is not nn.Conv2d:
                continue
            if blk.order != "cbap" or type(blk.bn) is not nn.Identity:
                continue
            if type(blk.act) is not nn.Identity or blk.shuffle is not None:
                continue
            j = _skip_identity([(None, k) for k in kids], i + 1)
            nxt = kids[j] if j < len(kids) else None
            if isinstance(nxt, ConvBlock) and isinstance(nxt.conv, XnorConv2d):
                convs.append(blk.conv)
    return convs


def _channels_last_(model: nn.Module) -> None:
    # the conv then runs NHWC (in and out) and the XNOR conv packs its NHWC output directly
    for conv in _stem_convs(model):
        conv.to(memory_format=torch.channels_last)


@torch.no_grad()
def _try_channels_last_(model: nn.Module, example: torch.Tensor | None) -> None:
    convs = _stem_convs(model)
    if not convs:
        return
    if example is None:
        g = torch.Generator().manual_seed(0)
        example = torch.randn(8, convs[0].in_channels, 32, 32, generator=g)
    trial = copy.deepcopy(model)
    _channels_last_(trial)
    for x in (example[:1], example):
        if not torch.equal(trial(x), model(x)):
            log.warning("xnor: channels_last float convs differ from NCHW here; kept NCHW")
            return
    _channels_last_(model)


class XnorNet(nn.Module):
    """Inference wrapper of a converted PlainNet (NIN, NIN-GC; see convert_binary_net_) that
    runs its layers from one flat list, without the Identity modules and the nested
    ConvBlock / Sequential calls: the same operations in the same order (bit-identical), about
    0.1 ms less Python per call, which matters at batch 1."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = getattr(model, "head", None)
        if head not in ("conv", "linear") or not isinstance(
            getattr(model, "features", None), nn.Sequential
        ):
            raise TypeError("XnorNet: expected a PlainNet (features, classifier, pool, head)")
        layers = [p for m in model.features for p in _flat_parts(m)]
        if head == "conv":
            layers += _flat_parts(model.classifier) + [model.pool, nn.Flatten(1)]
        else:
            layers += [model.pool, nn.Flatten(1), model.classifier]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _flat_parts(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, ConvBlock) and type(m).forward is ConvBlock.forward:
        if m.order == "bacp":
            parts = [m.bn, m.act, m.shuffle, m.conv]
        else:
            parts = [m.shuffle, m.conv, m.bn, m.act]
    else:
        parts = [m]
    keep = []
    for p in parts:
        if p is None or type(p) is nn.Identity:
            continue
        if type(p) is Activation and type(p.fn) is nn.Identity:
            continue
        keep.append(p)
    return keep


def set_isa_(model: nn.Module, isa: str | None) -> None:
    """Force an instruction set on every XNOR conv of `model` (tests); None: the best."""
    _isa_id(isa)
    for m in model.modules():
        if isinstance(m, XnorConv2d):
            m.isa = isa


__all__ = [
    "ISAS",
    "PackedWeight",
    "XnorBuildError",
    "XnorToolchainMissing",
    "UnpackBits",
    "XnorBitsConv2d",
    "XnorConv2d",
    "XnorNet",
    "available_isas",
    "best_isa",
    "binary_conv_names",
    "convert_binary_convs_",
    "convert_binary_net_",
    "extension",
    "pack_activations",
    "maxpool_bits",
    "pack_weight",
    "reference_conv",
    "set_isa_",
    "shuffle_permutation",
    "unpack_bits",
    "xnor_from_float_conv",
    "xnor_conv2d",
]
