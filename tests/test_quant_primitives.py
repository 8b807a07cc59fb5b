"""Quantizers against their reference formulas, value counts, and gradient modes."""

from __future__ import annotations

import pytest
import torch

from compress.quant import primitives as P

torch.manual_seed(0)


def ref_qk(x: torch.Tensor, k: int) -> torch.Tensor:
    n = 2**k - 1
    return torch.round(n * x) / n


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_dorefa_weight_matches_formula_and_level_count(bits):
    w = torch.randn(16, 8, 3, 3)
    t = torch.tanh(w)
    ref = 2 * ref_qk(t / (2 * t.abs().max()) + 0.5, bits) - 1
    q = P.dorefa_weight(w, bits)
    assert torch.allclose(q, ref, atol=1e-6)
    assert q.unique().numel() <= 2**bits and q.abs().max() <= 1


def test_dorefa_weight_gradient_flows_through_tanh():
    w = torch.randn(4, 4, requires_grad=True)
    P.dorefa_weight(w, 4).sum().backward()
    t = torch.tanh(w.detach())
    m = t.abs().max()
    # d/dw of 2 * (tanh(w) / (2 m) + 1/2) - 1 with m held constant = (1 - tanh^2) / m
    assert torch.allclose(w.grad, (1 - t**2) / m, atol=1e-5)


def test_ternary_weight_matches_twn_per_channel():
    w = torch.randn(8, 4, 3, 3)
    q = P.ternary_weight(w, gap=0.7, scale=True)
    for c in range(8):
        a = w[c].abs()
        delta = 0.7 * a.mean()
        mask = a > delta
        alpha = a[mask].mean()
        ref = torch.where(mask, torch.sign(w[c]) * alpha, torch.zeros_like(w[c]))
        assert torch.allclose(q[c], ref, atol=1e-6)
        assert q[c].unique().numel() <= 3
    unscaled = P.ternary_weight(w, gap=0.7, scale=False)
    assert set(unscaled.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_ternary_gap_controls_sparsity():
    w = torch.randn(8, 64)
    zeros = [(P.ternary_weight(w, gap=g) == 0).float().mean() for g in (0.3, 0.7, 1.2)]
    assert zeros[0] < zeros[1] < zeros[2]


def test_binary_weight_sign_scale_and_centering():
    w = torch.randn(6, 5, 3, 3)
    w[0, 0, 0, 0] = 0.0
    q = P.binary_weight(w, scale=False)
    assert set(q.unique().tolist()) == {-1.0, 1.0} and q[0, 0, 0, 0] == 1.0  # sign(0) = +1
    qs = P.binary_weight(w, scale=True)
    alpha = w.abs().flatten(1).mean(1)
    assert torch.allclose(qs, torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1))
    for c in range(6):
        assert qs[c].unique().numel() <= 2
    shifted = w + 5  # all positive: centering restores both signs
    assert P.binary_weight(shifted, scale=False, center=True).unique().numel() == 2


@pytest.mark.parametrize("fn", [P.ternary_weight, P.binary_weight])
def test_weight_quantizers_pass_gradient_straight_through(fn):
    w = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    fn(w).backward(g)
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_act_levels(bits):
    x = torch.randn(1000) * 2
    q = P.dorefa_act(x, bits)
    assert torch.allclose(q, ref_qk(x.clamp(0, 1), bits))
    assert q.unique().numel() <= 2**bits


def test_ternary_and_binary_act_values():
    x = torch.tensor([-2.0, -0.6, -0.4, 0.0, 0.4, 0.6, 2.0])
    assert P.ternary_act(x, threshold=0.5).tolist() == [-1, -1, 0, 0, 0, 1, 1]
    assert P.binary_act(x).tolist() == [-1, -1, -1, 1, 1, 1, 1]
    assert P.binary_act(torch.tensor([-0.0])).item() == 1.0  # both zeros are +1


def expected_grad(x: torch.Tensor, mode: str, lo: float, hi: float, span: float) -> torch.Tensor:
    if mode == "ste":
        return torch.ones_like(x)
    if mode == "saturate_ste":
        return ((x >= lo) & (x <= hi)).float()
    c, h = (lo + hi) / 2, (hi - lo) / 2
    return torch.clamp(span / h * (1 - (x - c).abs() / h), min=0)


@pytest.mark.parametrize("mode", P.GRAD_MODES)
@pytest.mark.parametrize(
    ("fn", "lo", "hi", "span"),
    [
        (lambda x, m: P.binary_act(x, grad=m), -1.0, 1.0, 2.0),
        (lambda x, m: P.ternary_act(x, grad=m), -1.0, 1.0, 2.0),
        (lambda x, m: P.dorefa_act(x, 2, grad=m), 0.0, 1.0, 1.0),
    ],
)
def test_act_gradients_follow_the_mode(fn, lo, hi, span, mode):
    x = torch.linspace(-2, 2, 401, requires_grad=True)
    fn(x, mode).sum().backward()
    assert torch.allclose(x.grad, expected_grad(x.detach(), mode, lo, hi, span), atol=1e-6)


def test_soft_ste_for_sign_is_two_minus_two_abs_x():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0], requires_grad=True)
    P.binary_act(x, grad="soft_ste").sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.5, 0.0]


def test_unknown_grad_mode():
    with pytest.raises(ValueError, match="unknown gradient mode 'fancy'"):
        P.surrogate_grad(torch.zeros(1), "fancy", 0, 1, 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_values_and_gradients(bits):
    torch.manual_seed(0)
    x = (torch.randn(2000) * 3).requires_grad_()
    alpha = torch.tensor(2.5, requires_grad=True)
    q = P.pact_act(x, alpha, bits)
    n = 2**bits - 1
    ref = torch.round(x.detach().clamp(0, 2.5) * n / 2.5) * 2.5 / n
    assert torch.allclose(q, ref) and q.unique().numel() <= 2**bits
    g = torch.randn(2000)
    q.backward(g)
    inside = (x.detach() >= 0) & (x.detach() <= 2.5)
    assert torch.equal(x.grad, torch.where(inside, g, 0.0))
    # the gradient of the same expression composed from autograd ops with a straight-through round
    a = torch.tensor(2.5, requires_grad=True)
    y = torch.minimum(torch.relu(x.detach()), a)
    (P.round_ste(y * n / a) * a / n).backward(g)
    assert torch.allclose(alpha.grad, a.grad, rtol=1e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pact_gradients_do_not_depend_on_memory_layout(memory_format):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 3
    g = torch.randn(4, 6, 5, 5)
    grads = []
    for t, gt in ((x.flatten(), g.flatten()), (x.contiguous(memory_format=memory_format), g)):
        t = t.clone().requires_grad_()
        alpha = torch.tensor(2.0, requires_grad=True)
        P.pact_act(t, alpha, 3).backward(
            gt.reshape(t.shape).contiguous(memory_format=memory_format) if t.dim() == 4 else gt
        )
        grads.append((t.grad.flatten(), alpha.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5)


@pytest.mark.parametrize(
    ("x_format", "g_format"),
    [
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
    ],
)
def test_pact_clip_gradient_with_input_and_gradient_in_different_layouts(x_format, g_format):
    """The clip's gradient dots two tensors as flat memory only when their layouts agree."""
    torch.manual_seed(0)
    x, g = torch.randn(4, 6, 5, 5) * 3, torch.randn(4, 6, 5, 5)
    ref = torch.tensor(2.0, requires_grad=True)
    P.pact_act(x.clone().requires_grad_(), ref, 3).backward(g)
    alpha = torch.tensor(2.0, requires_grad=True)
    t = x.contiguous(memory_format=x_format).requires_grad_()
    P.pact_act(t, alpha, 3).backward(g.contiguous(memory_format=g_format))
    assert torch.allclose(alpha.grad, ref.grad, rtol=1e-5)  # a wrong pairing: tens of percent


def test_a_gradient_mode_read_from_a_config_is_the_literal_one():
    """Modes come from YAML as strings built at run time, not interned literals."""
    x = torch.linspace(-2, 2, 41)
    grads = []
    for mode in (
        "saturate_ste",
        "".join(["saturate", "_ste"]),
        "soft_ste",
        "_".join(["soft", "ste"]),
    ):
        t = x.clone().requires_grad_()
        P.binary_act(t, grad=mode).sum().backward()
        grads.append(t.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[2], grads[3])
    assert torch.equal(grads[0], expected_grad(x, "saturate_ste", -1.0, 1.0, 2.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pact_low_precision_gradients_match_fp64(dtype):
    """Under autocast dtypes the rounding-error sum must not drown in rounding: compare with
    the gradient formula evaluated in fp64 on the same inputs and the same quantized output."""
    torch.manual_seed(0)
    x = (torch.randn(32, 16, 16, 16) * 2).to(dtype).requires_grad_()
    g = torch.randn(32, 16, 16, 16).to(dtype)
    alpha = torch.tensor(2.1, requires_grad=True)  # no bf16 / fp16 value: x never ties it
    q = P.pact_act(x, alpha, 2)
    q.backward(g)
    a, xd, gd, qd = alpha.item(), x.detach().double(), g.double(), q.detach().double()
    inside = (xd >= 0) & (xd <= a)
    ref = (gd * (qd - xd))[inside].sum() / a + gd[xd > a].sum()
    assert torch.allclose(alpha.grad.double(), ref, rtol=2e-3)  # q is exact in fp32 only
    assert torch.equal(x.grad, torch.where(inside, g, 0).to(dtype))


def test_sixteen_bit_activations_do_not_overflow_fp16():
    x = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float16)
    assert torch.isfinite(P.dorefa_act(x, 16)).all()
    q = P.pact_act(x, torch.tensor(1.0), 16)
    assert torch.isfinite(q).all() and q.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_pact_clip_is_kept_positive():
    q = P.pact_act(torch.tensor([0.5, 2.0]), torch.tensor(-1.0), 4)
    assert (q >= 0).all() and (q <= 1e-4).all()


def test_closed_interval_survives_flush_to_zero():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        P.dorefa_act(x, 2).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0]
    finally:
        torch.set_flush_denormal(False)


def test_pact_device_path_needs_no_host_read_and_equals_the_cpu_path():
    """On an accelerator PACT's backward keeps alpha a tensor (no host-device sync per layer);
    run here on the CPU, that path gives the same gradients as the scalar-bound kernels."""
    from compress.quant.primitives import pact_grads

    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6) * 3
    a = torch.tensor(1.7)
    q = x.clamp(0, 1.7).mul(15 / 1.7).round().mul(1.7 / 15)
    q[0, 0, 0, 0] = 1.7  # a value exactly on the bound
    x[0, 0, 0, 0] = 1.7
    g = torch.randn_like(x)
    host = pact_grads(g, x, q, a, on_host=True)
    device = pact_grads(g, x, q, a, on_host=False)
    assert torch.equal(host[0], device[0])
    assert torch.allclose(host[1], device[1], rtol=1e-6)
