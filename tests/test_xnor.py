"""XNOR + popcount binary conv (compress/deploy/xnor.py) against the fake-quant fp32 conv.

Exactness: the integer dot is bit-identical to F.conv2d(sign(x), sign(w)) (no bias). With a
bias, oneDNN's fp32 conv accumulates the bias into the sum (a rounding per step), while the
XNOR conv adds it once to the exact integer: bit-identical to conv + bias, allclose to
F.conv2d(..., bias). With a weight scale the XNOR conv rounds once (dot * scale): bit-identical
to the float64 conv rounded to fp32 (every partial sum of +-scale is exact in float64), and
allclose (rtol 1e-6, atol 4 eps K max(scale)) to the fp32 fake-quant conv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

xnor = pytest.importorskip("compress.deploy.xnor")

try:
    xnor.extension()
except xnor.XnorBuildError as e:  # no compiler / ninja on this machine
    pytest.skip(str(e), allow_module_level=True)

ISAS = xnor.available_isas()
EPS = torch.finfo(torch.float32).eps


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.copysign(torch.ones(()), x + 0.0)


# (cin, cout, kernel, stride, padding, groups, batch, size)
SHAPES = [
    (96, 160, 3, 1, 1, 1, 3, 9),
    (160, 96, 3, 2, 1, 2, 1, 8),
    (64, 64, 3, 1, 1, 1, 1, 8),
    (192, 192, 3, 2, 0, 4, 3, 9),
    (256, 256, 3, 1, 1, 4, 1, 6),
    (96, 160, 1, 1, 0, 1, 3, 7),
    (192, 160, 1, 2, 0, 2, 1, 8),
    (256, 64, 1, 1, 1, 4, 3, 5),
    (64, 192, 3, 2, 1, 2, 3, 7),
    (256, 256, 3, 1, 1, 16, 1, 8),  # Cg = 16: taps packed densely across word boundaries
    (40, 24, 3, 1, 1, 1, 3, 6),
]


def _case(cin, cout, k, groups, batch, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, size, size, generator=g)
    x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])  # sign(+-0) = +1
    w = sign(torch.randn(cout, cin // groups, k, k, generator=g))
    return x, w, torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.01


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_matches_fp32_conv(shape, isa):
    cin, cout, k, s, p, groups, batch, size = shape
    x, w, b, scale = _case(cin, cout, k, groups, batch, size)
    xs, packed = sign(x), xnor.pack_weight(w)

    def run(sc=None, bias=None):
        return xnor.xnor_conv2d(x, packed, sc, bias, s, p, groups, k, isa=isa)

    ref = F.conv2d(xs, w, None, s, p, 1, groups)
    assert torch.equal(run(), ref)  # integer arithmetic: bit-identical
    assert torch.equal(run(bias=b), ref + b[:, None, None])
    assert torch.allclose(run(bias=b), F.conv2d(xs, w, b, s, p, 1, groups), rtol=1e-6, atol=1e-5)
    ws = w * scale[:, None, None, None]
    exact = F.conv2d(xs.double(), ws.double(), None, s, p, 1, groups).float()
    assert torch.equal(run(scale), exact)  # one rounding of the exact dot * scale
    assert torch.equal(run(scale, b), exact + b[:, None, None])
    fake = F.conv2d(xs, ws, b, s, p, 1, groups)
    atol = 4 * EPS * k * k * (cin // groups) * float(scale.max())
    assert torch.allclose(run(scale, b), fake, rtol=1e-6, atol=atol)


def test_packed_input_and_packing_layout():
    x, w, b, _ = _case(96, 64, 3, 2, 2, 5)
    packed_x = xnor.pack_activations(sign(x), 2)
    assert packed_x.shape == (2, 5, 5, 2, 1) and packed_x.dtype == torch.int64
    bit = (packed_x[1, 3, 4, 1, 0] >> 7) & 1  # channel 48 + 7 of image 1 at (3, 4)
    assert int(bit) == int(x[1, 55, 3, 4] >= 0)
    pw = xnor.pack_weight(w)
    out = xnor.xnor_conv2d(packed_x, pw, None, b, 1, 1, 2)
    assert torch.equal(out, xnor.xnor_conv2d(x, pw, None, b, 1, 1, 2))
    assert pw.words.shape == (64, 7)  # 9 taps x 48 bits = 432 bits -> 7 words
    assert torch.equal(pw.tap_popcount.sum(1), (w > 0).flatten(1).sum(1).int())


def _wbab_nin_gc():
    from compress.models import create_from_arch
    from compress.quant import quantize_

    torch.manual_seed(0)
    model = create_from_arch({"name": "nin_gc", "order": "bacp", "num_classes": 10})
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    with torch.no_grad():  # non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_nin_gc_wbab_model():
    import copy

    model = _wbab_nin_gc()
    deployed = copy.deepcopy(model)
    names = xnor.convert_binary_convs_(deployed)
    assert len(names) == 7  # every block after the stem: 5x5, 3x3 and 1x1, grouped
    assert all(isinstance(deployed.get_submodule(n), xnor.XnorConv2d) for n in names)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
        # layer by layer on the same input: the XNOR conv equals the fake-quant conv
        for name in names:
            q, d = model.get_submodule(name), deployed.get_submodule(name)
            xin = sign(torch.randn(2, q.in_channels, 8, 8))
            assert torch.allclose(d(xin), q(xin), rtol=1e-6, atol=1e-4)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_from_qconv_unscaled_is_exact():
    from compress.quant.modules import QConv2d
    from compress.quant.quantizers import BinaryWeight

    conv = torch.nn.Conv2d(160, 96, 3, stride=2, padding=1, groups=2, bias=False)
    q = QConv2d.from_float(conv, BinaryWeight(scale=False, center=True)).eval()
    x = torch.randn(3, 160, 9, 9)
    with torch.no_grad():
        assert torch.equal(xnor.XnorConv2d.from_qconv(q)(x), xnor.reference_conv(q, x))


def test_rejects_non_binary():
    from compress.quant.modules import QConv2d
    from compress.quant.quantizers import TernaryWeight

    q = QConv2d.from_float(torch.nn.Conv2d(8, 8, 3), TernaryWeight())
    with pytest.raises(TypeError):
        xnor.XnorConv2d.from_qconv(q)
