from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from compress.fuse import fuse_bn_
from compress.metrics import _hook_macs, count_macs, count_params, latency_ms, size_bytes
from compress.models import create_model, list_models
from compress.quant import QConv2d, quantize_


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 8 * 3*3*3 = 216 weights
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),  # 8 * 2*3*3 = 144 weights
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),  # 80 weights + 10 biases
    )


def test_params_and_macs_follow_the_formulas():
    net = small_net()
    assert count_params(net) == 216 + 144 + 90
    # per output pixel: (in / groups) * kh * kw MACs per output channel; 8x8 image
    assert count_macs(net, (3, 8, 8)) == 64 * 216 + 64 * 144 + 80


def test_size_counts_quantized_weights_at_their_width():
    net = small_net()
    assert size_bytes(net) == 4 * (216 + 144 + 90)
    quantize_(net, {"weight": {"kind": "binary", "scale": False}, "keep_first_last": False})
    # binary weights at 1 bit; the linear's bias stays at 32 bits
    assert size_bytes(net) == 216 // 8 + 144 // 8 + 80 // 8 + 4 * 10


class Sleepy(nn.Module):
    """A forward pass of a known duration: 20 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return self.conv(x)


def test_latency_is_measured_and_channels_last_converts_the_model():
    assert 19 <= latency_ms(Sleepy(), (3, 8, 8), batch_size=1, reps=3) < 60
    model = create_model("resnet20")
    latency_ms(model, (3, 32, 32), batch_size=2, reps=3, channels_last=True)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training  # restored, and the converted parameters still train
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.conv1.weight.grad is not None


# -- count_macs counts ops (torch.utils.flop_counter), not nn.Conv2d / nn.Linear modules
ZOO = [(name, {}, (3, 32, 32)) for name in list_models()] + [
    (name, {"source": "torchvision", "num_classes": 10}, (3, 64, 64))
    for name in (
        "resnet18",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "regnet_y_400mf",
        "convnext_tiny",
    )
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), ZOO, ids=[z[0] for z in ZOO])
def test_the_op_counter_equals_the_old_hook_counter_on_the_zoo(name, kwargs, shape):
    """Every MAC of these models sits in an nn.Conv2d or nn.Linear module (their SE blocks are
    1x1 convs, ConvNeXt's pointwise layers nn.Linear), so both counters agree exactly."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    assert count_macs(model, shape) == _hook_macs(model, shape) > 0


def test_attention_that_bypasses_linear_modules_is_counted():
    """nn.MultiheadAttention runs its projections as F.linear on its own weights and its
    attention as scaled_dot_product_attention: the hook counter saw none of it (and its
    eval-mode fast path, one fused op, not even the flop counter; count_macs turns it off)."""
    s, e, layers = 17, 32, 2  # (32 / 8)^2 patches + the class token, width 32
    vit = torchvision.models.VisionTransformer(32, 8, layers, 4, e, 64, num_classes=10)
    missed = layers * (s * e * 3 * e + s * e * e + 2 * s * s * e)  # qkv, out_proj, qk^T and av
    assert count_macs(vit, (3, 32, 32)) == _hook_macs(vit, (3, 32, 32)) + missed
    assert torch.backends.mha.get_fastpath_enabled()  # restored


class MatmulAndAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 16))  # no nn.Linear anywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 2, 6, 12), heads x tokens
        q = x @ self.w  # (1, 2, 6, 16)
        v = q @ torch.ones(16)  # a matrix-vector product: (1, 2, 6)
        return F.scaled_dot_product_attention(q, q, q) + v[..., None]


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_matmuls_and_attention_outside_modules_are_counted(backend):
    """The CPU flash kernel scaled_dot_product_attention may pick has no formula in torch's
    counter (it would count 0): count_macs adds one, equal to the math path's bmm count."""
    h, n, d, k = 2, 6, 16, 12
    expected = h * n * k * d + h * n * d + 2 * h * n * n * d  # x @ w, q @ ones, qk^T and av
    with sdpa_kernel([backend]):
        assert count_macs(MatmulAndAttention(), (h, n, k)) == expected
    assert _hook_macs(MatmulAndAttention(), (h, n, k)) == 0


class Products(nn.Module):
    """Products torch's flop counter has no formula for (it would count them 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, 32, 16)
        a, w, v = x[0], torch.ones(16, 24), torch.ones(16)
        torch.mv(a, v)  # 32 * 16 MACs
        torch.addmv(torch.zeros(32), a, v)  # 32 * 16
        torch.dot(v, v) + torch.vdot(v, v)  # 16 + 16
        torch.addbmm(torch.zeros(32, 24), x.expand(2, 32, 16), w.expand(2, 16, 24))  # 2 * 32*16*24
        torch._addmm_activation(torch.zeros(24), a, w, use_gelu=True)  # 32 * 16 * 24
        return torch._int_mm(a.to(torch.int8), w.to(torch.int8))  # 32 * 16 * 24


def test_vector_and_fused_products_are_counted():
    assert count_macs(Products(), (32, 16)) == 2 * 32 * 16 + 2 * 16 + 4 * 32 * 16 * 24


def test_transposed_and_grouped_convs_follow_the_formula():
    """A transposed conv's MACs run per input pixel: in x (out / groups) x kernel area."""
    net = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.Conv2d(6, 6, 3, groups=6)
    )
    assert count_macs(net, (4, 5, 5)) == 25 * 4 * 3 * 9 + 9 * 9 * 6 * 9  # 11x11 -> 9x9 out
    assert _hook_macs(net, (4, 5, 5)) == 9 * 9 * 6 * 9  # the old counter skipped ConvTranspose


def test_quantized_and_fused_models_count_as_their_float_model():
    """Quantized layers run F.conv2d / F.linear on their quantized weight; fusion changes the
    weights, not the shapes: the same MACs."""
    float_macs = count_macs(create_model("resnet20"), (3, 32, 32))
    cfg = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}
    quant = quantize_(create_model("resnet20"), cfg)
    assert any(isinstance(m, QConv2d) for m in quant.modules())
    assert count_macs(quant, (3, 32, 32)) == float_macs
    for exact in (False, True):
        fused = copy.deepcopy(quant).eval()
        fuse_bn_(fused, exact=exact)
        assert count_macs(fused, (3, 32, 32)) == float_macs


def test_xnor_convs_report_the_macs_of_the_convs_they_replace(monkeypatch):
    """The XNOR conv is a C++ kernel torch's flop counter does not see: it reports its MACs
    through opaque_macs, on float input and on packed bits (bit-output layers)."""
    xnor = pytest.importorskip("compress.deploy.xnor")
    try:
        xnor.extension()
    except xnor.XnorToolchainMissing as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    model = create_model("nin", order="bacp")
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    fuse_bn_(model.eval())
    shape = (3, 32, 32)
    ref = count_macs(model, shape)
    assert ref == count_macs(create_model("nin"), shape)
    floats, bits = copy.deepcopy(model), copy.deepcopy(model)
    names = xnor.convert_binary_convs_(floats)
    assert xnor.convert_binary_net_(bits)
    for net in (floats, bits, xnor.XnorNet(bits)):
        assert count_macs(net, shape) == ref
    binary = sum(_hook_macs(model.get_submodule(n), _input_shape(model, n, shape)) for n in names)
    monkeypatch.delattr(xnor.XnorConv2d, "opaque_macs")
    assert count_macs(floats, shape) == ref - binary > 0  # what the flop counter alone sees


def _input_shape(model: nn.Module, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    seen = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    h.remove()
    return tuple(seen[0][1:])
