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

The instruction set is chosen at run time: AVX-512 VPOPCNTQ where the CPU has
avx512vpopcntdq, else AVX2 (nibble-table popcount), else portable __builtin_popcountll; see
`best_isa()`. Threads: at::parallel_for (torch.set_num_threads).

The extension is compiled once with torch.utils.cpp_extension.load (g++ and ninja) into
$COMPRESS_EXT_DIR or ~/.cache/compress/torch_extensions/<name>, and reused afterwards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.blocks import ConvBlock
from compress.quant.modules import QConv2d
from compress.quant.quantizers import BinaryAct, BinaryWeight

SOURCE = Path(__file__).with_name("binary_conv.cpp")
ISAS = {"scalar": 0, "avx2": 1, "avx512_vpopcntdq": 2}
_EXT = None


class XnorBuildError(RuntimeError):
    pass


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
        raise XnorBuildError(
            f"compress.deploy.xnor needs a C++ compiler ({cxx!r} not found on PATH; "
            "install g++ or set CXX) to build its XNOR conv extension"
        )
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError as e:
        raise XnorBuildError(
            "compress.deploy.xnor needs ninja to build its extension: pip install ninja"
        ) from e
    try:
        _EXT = cpp_extension.load(
            name="compress_xnor_conv",
            sources=[str(SOURCE)],
            build_directory=str(_build_dir()),
            extra_cflags=["-O3", "-fopenmp"],
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
    words: torch.Tensor  # int64 [O, Kw]: each output channel's receptive field as bits
    tap_popcount: torch.Tensor  # int32 [O, KH * KW]: popcount of each tap's bits
    in_per_group: int  # Cg
    kernel: tuple[int, int]


def pack_weight(w: torch.Tensor) -> PackedWeight:
    """Sign bits (bit 1 = +1, sign(0) = +1) of a [O, Cg, KH, KW] weight."""
    words, pop = extension().pack_weight(w.detach().float().contiguous())
    return PackedWeight(words, pop, int(w.shape[1]), (int(w.shape[2]), int(w.shape[3])))


def pack_activations(x_sign: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Sign bits of a float NCHW tensor (bit 1 = +1, sign(0) = +1) as int64
    [N, H, W, groups, ceil(C / groups / 64)]: 64 channels of a group per word."""
    return extension().pack_activations(x_sign.detach().float(), int(groups))


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


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
    computed with XNOR + popcount. `x`: a float NCHW tensor (its sign is taken) or the output
    of `pack_activations(x, groups)`. `isa` forces an instruction set (tests); default: best."""
    kh, kw = _pair(kernel) if kernel is not None else packed_weight.kernel
    if (kh, kw) != packed_weight.kernel:
        raise ValueError(f"kernel={(kh, kw)} but the weight was packed as {packed_weight.kernel}")
    if x.dtype != torch.int64:
        if x.shape[1] != packed_weight.in_per_group * groups:
            raise ValueError(
                f"input has {x.shape[1]} channels, the weight expects "
                f"{packed_weight.in_per_group} x {groups} groups"
            )
        x = pack_activations(x, groups)
    elif x.shape[3] != groups:
        raise ValueError(f"activations were packed for {x.shape[3]} groups, not {groups}")
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    return extension().xnor_conv2d(
        x,
        packed_weight.words,
        packed_weight.tap_popcount,
        None if scale is None else scale.detach().float().contiguous(),
        None if bias is None else bias.detach().float().contiguous(),
        packed_weight.in_per_group,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        _isa_id(isa),
    )


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
        self.in_per_group, self.kernel = packed.in_per_group, packed.kernel
        self.stride, self.padding, self.groups = stride, padding, groups
        self.in_channels, self.out_channels = packed.in_per_group * groups, out_channels
        self.isa: str | None = None  # None: the best the CPU has

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.words, self.tap_popcount, self.in_per_group, self.kernel)

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
            pack_weight(q),
            scale,
            bias,
            _pair(qconv.stride),
            _pair(qconv.padding),
            qconv.groups,
            qconv.out_channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return xnor_conv2d(
            x,
            self.packed,
            self.scale,
            self.bias,
            self.stride,
            self.padding,
            self.groups,
            self.kernel,
            self.isa,
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
    return names


__all__ = [
    "ISAS",
    "PackedWeight",
    "XnorBuildError",
    "XnorConv2d",
    "available_isas",
    "best_isa",
    "binary_conv_names",
    "convert_binary_convs_",
    "extension",
    "pack_activations",
    "pack_weight",
    "reference_conv",
    "xnor_conv2d",
]
