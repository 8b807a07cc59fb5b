"""Property-based tests (hypothesis) where the input space is too large for hand-picked cases:
bit packing, packed layers, quantizer grids and idempotence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compress.pack import dequantize, pack_bits, pack_layer, unpack_bits
from compress.quant import QConv2d
from compress.quant import primitives as P
from compress.quant.lsq import codes, lsq_quantize, weight_bounds
from compress.quant.quantizers import weight_quantizer

# each example is milliseconds; no per-example deadline (a loaded CI machine is slow at times)
FAST = settings(max_examples=60, deadline=None)


@FAST
@given(bits=st.integers(1, 16), n=st.integers(0, 257), seed=st.integers(0, 2**31 - 1))
def test_pack_then_unpack_is_the_identity(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (n,), generator=g)
    data = pack_bits(values, bits)
    assert data.dtype == torch.uint8 and data.numel() == -(-n * bits // 8)  # whole bytes, no more
    assert torch.equal(unpack_bits(data, bits, n), values)


@FAST
@given(bits=st.integers(1, 8), n=st.integers(1, 64))
def test_a_code_beyond_its_bits_is_refused(bits, n):
    values = torch.zeros(n, dtype=torch.int64)
    values[-1] = 2**bits
    with pytest.raises(ValueError, match=f"codes out of range for {bits} bits"):
        pack_bits(values, bits)


@FAST
@given(
    kind=st.sampled_from(["dorefa", "lsq", "binary", "ternary"]),
    bits=st.integers(2, 8),
    cin=st.integers(1, 6),
    cout=st.integers(1, 9),
    k=st.sampled_from([1, 3]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_packed_layer_decodes_to_its_quantized_weight_bit_for_bit(
    kind, bits, cin, cout, k, scale, seed
):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k)
    with torch.no_grad():
        conv.weight.mul_(scale)  # weights of any magnitude
    cfg = {"kind": kind} if kind in ("binary", "ternary") else {"kind": kind, "bits": bits}
    layer = QConv2d.from_float(conv, weight_quantizer(cfg))
    entry = pack_layer(layer)  # raises when the codes do not decode exactly
    assert torch.equal(dequantize(entry), layer.quantized_weight())
    assert entry["codes"].numel() == -(-conv.weight.numel() * entry["bits"] // 8)


@FAST
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.01, 100))
def test_dorefa_activations_sit_on_their_grid_and_are_idempotent(bits, seed, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, generator=g) * spread
    q = P.dorefa_act(x, bits)
    n = 2**bits - 1
    assert q.min() >= 0 and q.max() <= 1
    assert torch.equal(torch.round(q * n) / n, q)  # every value is k / (2^bits - 1)
    assert torch.equal(P.dorefa_act(q, bits), q)


@FAST
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3))
def test_dorefa_weights_sit_on_their_symmetric_grid(bits, seed, spread):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 7, generator=g) * spread
    q = P.dorefa_weight(w, bits).double()
    n = 2**bits - 1
    level = (q + 1) / 2 * n  # 0..n
    assert torch.allclose(level, level.round(), atol=1e-4) and level.min() >= -1e-6
    assert level.max() <= n + 1e-4
    # the largest |tanh w| maps to an end of the grid: the top when it is positive, else 0
    assert level.round().max() == n or level.round().min() == 0


@FAST
@given(
    bits=st.integers(2, 8),
    seed=st.integers(0, 2**31 - 1),
    step=st.floats(1e-4, 10.0),
    spread=st.floats(1e-3, 1e3),
)
def test_lsq_weights_are_integer_steps_in_range_and_idempotent(bits, seed, step, spread):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(300, generator=g) * spread
    qn, qp = weight_bounds(bits)
    s = torch.tensor(step)
    c = codes(v, s, qn, qp)
    assert c.min() >= -qn and c.max() <= qp and torch.equal(c, c.round())  # Q_N is a magnitude
    q = lsq_quantize(v, s, qn, qp, 1.0)
    assert torch.equal(q, c * s)
    assert torch.equal(lsq_quantize(q, s, qn, qp, 1.0), q)
