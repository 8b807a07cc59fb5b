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
except xnor.XnorToolchainMissing as e:  # no compiler / ninja on this machine: nothing to test
    pytest.skip(str(e), allow_module_level=True)
# any other XnorBuildError (the kernel's source does not compile) fails every test here

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
    # channels in lanes: Og not a multiple of 8 / 16, 1..3 weight blocks, Cg not a multiple
    # of 64 (dense im2col path) and a multiple (direct tap indexing), 5x5, odd sizes, pixel
    # tails (plane not a multiple of 16), stride 2 with padding 2, batch > 1
    (128, 12, 3, 1, 1, 1, 2, 5),
    (128, 20, 5, 1, 2, 1, 2, 7),
    (64, 40, 5, 2, 2, 2, 2, 9),
    (70, 30, 1, 1, 0, 1, 2, 3),
    (130, 18, 3, 1, 1, 1, 1, 4),
    (256, 256, 1, 1, 0, 16, 2, 6),
    (384, 192, 3, 1, 1, 2, 1, 11),
    (32, 8, 5, 1, 2, 1, 1, 17),
    (8, 16, 3, 1, 0, 2, 2, 4),
    # 1x1, stride 1, no padding, Cg % 64 == 0: the pixels-in-lanes kernel (AVX-512), planes of
    # 256 (NIN), 49 (a 17-pixel tail) and 25 pixels, Og not a multiple of 4
    (192, 160, 1, 1, 0, 1, 2, 16),
    (128, 20, 1, 1, 0, 2, 3, 7),
    (256, 36, 1, 1, 0, 2, 1, 5),
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
    xs, packed = sign(x), xnor.pack_weight(w, groups)

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
    pw = xnor.pack_weight(w, 2)
    out = xnor.xnor_conv2d(packed_x, pw, None, b, 1, 1, 2)
    assert torch.equal(out, xnor.xnor_conv2d(x, pw, None, b, 1, 1, 2))
    # [groups, ceil(Og / 8), Kw, 8]: 9 taps x 48 bits = 432 bits -> 7 words
    assert pw.words.shape == (2, 4, 7, 8)
    assert pw.tap_popcount.shape == (2, 9, 32)  # Og = 32 (a multiple of 16)
    pop = pw.tap_popcount.permute(0, 2, 1)  # [G, Og, T]
    assert torch.equal(pop.reshape(64, 9).sum(1), (w > 0).flatten(1).sum(1).int())
    # channel 8 * 2 + 3 of group 1 is lane 3 of block 2: its first word = taps 0 (bits 0..47)
    # and 1 (bits 48..63)
    o = 32 + 19
    bits = (w[o].permute(1, 2, 0).reshape(-1) > 0).long()[:64]  # [kh, kw, c] order
    word = int((bits << torch.arange(64)).sum())  # wraps to int64 like the packed word
    assert int(pw.words[1, 2, 0, 3]) == word


# (channels, groups, width) for the fused sign + pack: channel counts around 64, Cg < 64
# dividing 64 (words of several groups split from one 64-channel word: Cg = 8, 16, 32), Cg
# not dividing 64 (20, 100), widths around 16 (masked tails)
PACK_CASES = [
    (64, 1, 16),
    (200, 2, 23),
    (48, 3, 5),
    (130, 1, 33),
    (256, 16, 8),
    (256, 2, 7),
    (384, 3, 16),
    (96, 12, 5),
    (64, 2, 9),
    (100, 5, 20),
]


@pytest.mark.parametrize("isa", ISAS)
def test_pack_activations_all_widths(isa):
    """The fused sign + pack (AVX-512 bit transpose) against a plain reference, and the conv on
    a float input (packed inside the call) against the conv on the packed input."""
    for c, groups, width in PACK_CASES:
        x = torch.randn(2, c, 3, width)
        x[0, 0, 0, :2] = torch.tensor([0.0, -0.0])
        got = xnor.pack_activations(x, groups)
        cg = c // groups
        bits = (sign(x) > 0).long().reshape(2, groups, cg, 3, width).permute(0, 3, 4, 1, 2)
        wg = (cg + 63) // 64
        bits = F.pad(bits, (0, wg * 64 - cg)).reshape(2, 3, width, groups, wg, 64)
        ref = (bits << torch.arange(64)).sum(-1)
        assert torch.equal(got, ref)
        # as the conv's own input path (1x1 identity-like check through the kernel)
        w = sign(torch.randn(8 * groups, cg, 1, 1))
        pw = xnor.pack_weight(w, groups)
        assert torch.equal(
            xnor.xnor_conv2d(x, pw, groups=groups, isa=isa),
            xnor.xnor_conv2d(got, pw, groups=groups, isa=isa),
        )


def test_isas_agree_on_large_kernel():
    x, w, b, scale = _case(192, 160, 3, 1, 4, 16)
    pw = xnor.pack_weight(w)
    outs = [xnor.xnor_conv2d(x, pw, scale, b, 1, 1, isa=isa) for isa in ISAS]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_rejects_mismatched_groups():
    x, w, _, _ = _case(64, 32, 3, 2, 1, 5)
    with pytest.raises(ValueError, match=r"^groups=2 but the weight was packed for 1$"):
        xnor.xnor_conv2d(x, xnor.pack_weight(w, 1), groups=2)


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
    # the sign pass before each XNOR conv is gone: the conv takes the sign while packing
    blocks = [deployed.get_submodule(n.rpartition(".")[0]) for n in names]
    assert all(isinstance(b.act.fn, torch.nn.Identity) for b in blocks)
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


def test_nin_gc_fused_matches_float64():
    """After BN fusion (as in bench/deploy_speed.py) the XNOR model equals a float64 evaluation
    of the same fake-quant model to fp32 rounding. The fp32 fake-quant model can be farther off:
    where an exact pre-activation is 0 its conv leaves a +-1e-8 residue and the BinaryAct after
    it flips sign, while the XNOR conv returns the exact 0.0 (sign +1)."""
    import copy

    from compress.fuse import fuse_bn_

    model = _wbab_nin_gc()
    fuse_bn_(model)
    deployed = copy.deepcopy(model)
    assert len(xnor.convert_binary_convs_(deployed)) >= 6
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        out = deployed(x)
    assert torch.allclose(out.double(), ref64, rtol=1e-5, atol=1e-5)


def test_exact_zero_pre_activation():
    """dot = 0 with bias 0 gives exactly 0.0 (not a rounding residue), with and without scale."""
    x = torch.ones(1, 128, 3, 3)
    x[:, 64:] = -1  # half the channels -1: against an all-+1 weight every dot is 0
    w = torch.ones(8, 128, 3, 3)
    pw = xnor.pack_weight(w)
    for isa in ISAS:
        for scale in (None, torch.full((8,), 0.0433)):
            out = xnor.xnor_conv2d(x, pw, scale, torch.zeros(8), 1, 1, isa=isa)
            assert torch.equal(out, torch.zeros_like(out)) and not torch.signbit(out).any()


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
    with pytest.raises(TypeError, match="needs a QConv2d with a BinaryWeight quantizer"):
        xnor.XnorConv2d.from_qconv(q)


# ---------------------------------------------------------------- packed binary network
# (cin, cout, kernel, stride, padding, groups, batch, size, next groups, shuffle, max pool)
BIT_CASES = [
    (192, 160, 1, 1, 0, 1, 2, 16, 1, 0, None),  # NIN 1x1 (pixels-in-lanes kernel)
    (160, 96, 1, 1, 0, 1, 2, 16, 1, 0, (3, 2, 1)),  # NIN 1x1 -> max pool 3/2/1
    (96, 192, 5, 1, 2, 1, 1, 8, 1, 0, None),
    (256, 256, 1, 1, 0, 2, 2, 8, 16, 2, (2, 2, 0)),  # NIN-GC: shuffle, pool, Cg' = 16
    (256, 512, 3, 1, 1, 16, 2, 8, 4, 16, None),
    (512, 1024, 3, 1, 1, 32, 1, 4, 8, 32, None),
    (40, 24, 3, 1, 1, 1, 3, 6, 3, 4, (3, 2, 1)),  # Cg' = 8 (split words), odd pool tails
    (128, 20, 5, 1, 2, 1, 2, 7, 2, 2, (2, 2, 0)),  # Cg' = 10 (does not divide 64)
    (64, 200, 3, 2, 1, 1, 2, 9, 1, 5, None),  # Cg' = 200: 4 words, stride 2
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", BIT_CASES, ids=lambda s: "-".join(map(str, s)))
def test_bit_output_matches_float_path(case, isa):
    """xnor_conv2d_bits = pack(maxpool(shuffle(xnor_conv2d(...)))) bit for bit, from a float
    and from a packed input, including exact zeros (bias 0: sign(0) = +1) and unscaled."""
    cin, cout, k, s, p, groups, batch, size, g2, shuffle, pool = case
    x, w, b, scale = _case(cin, cout, k, groups, batch, size)
    b[: cout // 3] = 0.0  # dots of 0 with bias 0: exact zeros
    pw = xnor.pack_weight(w, groups)
    perm = xnor.shuffle_permutation(cout, shuffle) if shuffle else torch.empty(0, dtype=torch.long)
    pk, ps, pp = pool or (0, 1, 0)
    ext = xnor.extension()
    for sc in (scale, None):
        y = xnor.xnor_conv2d(x, pw, sc, b, s, p, groups, isa=isa)
        if shuffle:
            y = y.view(batch, shuffle, cout // shuffle, *y.shape[2:]).transpose(1, 2)
            y = y.reshape(batch, cout, *y.shape[3:])
        if pool:
            y = F.max_pool2d(y, pk, ps, pp)
        ref = xnor.pack_activations(y, g2)
        for xin in (x, xnor.pack_activations(x, groups)):
            got = ext.xnor_conv2d_bits(
                xin,
                pw.words,
                pw.tap_popcount,
                sc,
                b,
                cin // groups,
                cout,
                k,
                k,
                s,
                s,
                p,
                p,
                xnor.ISAS[isa],
                perm,
                g2,
                pk,
                ps,
                pp,
            )
            assert torch.equal(got, ref)
        assert torch.equal(xnor.unpack_bits(ref, cout), sign(y))


def test_maxpool_bits():
    x = torch.randn(2, 70, 7, 9)
    for k, s, p in ((3, 2, 1), (2, 2, 0), (3, 1, 1)):
        got = xnor.maxpool_bits(xnor.pack_activations(x, 1), k, s, p)
        assert torch.equal(got, xnor.pack_activations(F.max_pool2d(x, k, s, p), 1))


def _wbab(name, seed):
    from compress.fuse import fuse_bn_
    from compress.models import create_from_arch
    from compress.quant import quantize_

    torch.manual_seed(seed)
    model = create_from_arch({"name": name, "order": "bacp", "num_classes": 10})
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.eval()
    fuse_bn_(model)
    return model


@pytest.mark.parametrize("name", ["nin", "nin_gc"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_net_matches_float_output_path(name, seed):
    """The packed network (binary layers pass bits; shuffle and max pool in bit space) equals the
    float-output XNOR model bit for bit (and so float64 to fp32 rounding), for every ISA."""
    import copy

    model = _wbab(name, seed)
    ref_model = copy.deepcopy(model)
    xnor.convert_binary_convs_(ref_model)
    net = copy.deepcopy(model)
    bits = xnor.convert_binary_net_(net)
    assert len(bits) == 6  # all binary blocks but the last pass bits
    assert all(isinstance(net.get_submodule(n), xnor.XnorBitsConv2d) for n in bits)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 32, generator=g)
            ref = ref_model(x)
            for isa in ISAS:
                xnor.set_isa_(net, isa)
                out = net(x)
                assert torch.equal(out, ref), (isa, batch, (out - ref).abs().max())
                assert torch.equal(xnor.XnorNet(net)(x), ref)
        if seed == 0:
            ref64 = copy.deepcopy(model).double()(x.double())
            assert torch.allclose(out.double(), ref64, rtol=1e-5, atol=1e-5)


def test_binary_net_falls_back_where_bits_cannot_pass():
    """An unfused BN before a binary block, or an unsupported layer in between, keeps the
    float-output conv for that block: still exact."""
    import copy

    model = _wbab("nin", 0)
    model.features[5].bn = torch.nn.BatchNorm2d(192).eval()  # a BN that was not folded
    with torch.no_grad():
        model.features[5].bn.running_mean.uniform_(-0.5, 0.5)
    model.features[7] = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    ref_model = copy.deepcopy(model)
    xnor.convert_binary_convs_(ref_model)
    net = copy.deepcopy(model)
    bits = xnor.convert_binary_net_(net)
    assert "features.4.conv" not in bits and "features.6.conv" not in bits
    assert type(net.features[4].conv) is xnor.XnorConv2d
    assert type(net.features[6].conv) is xnor.XnorConv2d
    assert isinstance(net.features[7], torch.nn.MaxPool2d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), ref_model(x))


@pytest.mark.parametrize("name", ["nin", "nin_gc"])
def test_binary_net_fast_options(name):
    """channels_last (NHWC stem, packed straight from NHWC; kept only where it is bit-identical)
    is exact; xnor_scaled_convs (the last binary block's BN-folded +-t[o] conv on bits too)
    is within fp32 rounding of the float-output model and float64."""
    import copy

    model = _wbab(name, 1)
    ref_model = copy.deepcopy(model)
    xnor.convert_binary_convs_(ref_model)
    fast = copy.deepcopy(model)
    xnor.convert_binary_net_(fast, channels_last=True)
    fastest = copy.deepcopy(model)
    xnor.convert_binary_net_(fastest, channels_last=True, xnor_scaled_convs=True)
    last = fastest.features[9]
    assert type(last.conv) is xnor.XnorConv2d and isinstance(last.act, torch.nn.Identity)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = ref_model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
        for isa in ISAS:
            xnor.set_isa_(fast, isa)
            xnor.set_isa_(fastest, isa)
            assert torch.equal(fast(x), ref)
            out = fastest(x)
            assert (out - ref).abs().max() <= 1e-6 and torch.equal(out.argmax(1), ref.argmax(1))
            assert torch.equal(xnor.XnorNet(fastest)(x), out)  # the flat forward: same ops
            assert torch.allclose(out.double(), ref64, rtol=1e-5, atol=1e-6)


def test_nhwc_float_input_and_unpack_layouts():
    """A channels_last float input is packed without an NCHW copy: same result; unpack_bits
    to channels_last memory gives the same values."""
    for cin, groups, k, p in ((192, 1, 1, 0), (100, 2, 3, 1), (256, 16, 3, 1)):
        x, w, b, scale = _case(cin, 32, k, groups, 2, 7)
        pw = xnor.pack_weight(w, groups)
        xc = x.contiguous(memory_format=torch.channels_last)
        for isa in ISAS:
            ref = xnor.xnor_conv2d(x, pw, scale, b, 1, p, groups, isa=isa)
            assert torch.equal(xnor.xnor_conv2d(xc, pw, scale, b, 1, p, groups, isa=isa), ref)
        bits = xnor.pack_activations(x, groups)
        cl = xnor.unpack_bits(bits, cin, channels_last=True)
        assert cl.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(cl, sign(x)) and torch.equal(xnor.unpack_bits(bits, cin), sign(x))
