"""LSQ (compress.quant.lsq and its quantizers): the forward and every gradient against
references written here, the step initialisation, checkpoints that keep the learned steps,
the config checks, and a zoo model whose steps are learned."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.config import ACT_KINDS, WEIGHT_KINDS
from compress.engine import TrainConfig, build_optimizer
from compress.errors import ConfigError
from compress.models import create_model
from compress.quant import QConv2d, QLinear, applied_label, bit_widths, quant_label, quantize_
from compress.quant import lsq as L
from compress.quant.api import act_quantizers, to_float
from compress.quant.quantizers import LSQAct, LSQWeight, act_quantizer, weight_quantizer
from compress.spec import checkpoint_state, model_from_checkpoint

BITS = (2, 3, 4, 8)
W4A4L = {"weight": {"kind": "lsq", "bits": 4}, "act": {"kind": "lsq", "bits": 4}}


# ---------------------------------------------------------------- references (independent)
def bounds(role: str, bits: int) -> tuple[int, int]:
    """(Q_N, Q_P) written out: the paper's signed / unsigned ranges; 8-bit weights [-127, 127]."""
    if role == "weight":
        return (127, 127) if bits == 8 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    if role == "signed":
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def ref_autograd(v, s, qn, qp, g, per_channel):
    """The paper's formulation with autograd: a gradient-scaled step, clamp, a
    straight-through round, times the step."""
    s_g = s * g + (s - s * g).detach()  # value s, gradient g * d/ds
    sv = s_g.view(-1, *([1] * (v.dim() - 1))) if per_channel else s_g
    r = torch.clamp(v / sv, -qn, qp)
    return (r + (torch.round(r) - r).detach()) * sv


def ref_grads(grad, v, s, qn, qp, g, per_channel):
    """The paper's gradients as plain tensor formulas (r = v / s)."""
    sv = s.view(-1, *([1] * (v.dim() - 1))) if per_channel else s
    r = v / sv
    below, above = r < -qn, r > qp
    inside = ~below & ~above
    gv = grad * inside
    ds = torch.where(inside, torch.round(r) - r, torch.zeros_like(r))
    ds = ds - qn * below + qp * above
    gs = grad * ds
    gs = gs.reshape(len(s), -1).sum(1) if per_channel else gs.sum()
    return gv, g * gs


def _data(role: str, bits: int, dtype=torch.float64):
    """Input, step and upstream gradient: the step puts values below, inside and above range."""
    gen = torch.Generator().manual_seed(bits)
    if role == "weight":
        v = torch.randn(6, 4, 3, 3, generator=gen, dtype=dtype)
        s = (torch.rand(6, generator=gen, dtype=dtype) * 0.5 + 0.5) * 2 / bounds(role, bits)[1]
    else:
        v = torch.randn(5, 3, 4, 4, generator=gen, dtype=dtype) * 2
        s = torch.tensor(1.5 / 2 ** (bits - 1), dtype=dtype)
    grad = torch.randn(v.shape, generator=gen, dtype=dtype)
    return v, s, grad


def _module(role: str, bits: int, s: torch.Tensor) -> nn.Module:
    q = LSQWeight(bits) if role == "weight" else LSQAct(bits, signed=role == "signed")
    q.step = nn.Parameter(s.clone())
    q.initialized.fill_(True)
    return q.to(s.dtype).train()


# ---------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("role", ["weight", "unsigned", "signed"])
def test_forward_and_gradients_match_the_paper(role, bits):
    v, s, grad = _data(role, bits)
    qn, qp = bounds(role, bits)
    per_channel = role == "weight"
    # N: elements per output channel (weights), features per sample (activations)
    n = v[0].numel()
    g = 1 / math.sqrt(n * qp)
    q = _module(role, bits, s)
    assert (q.qn, q.qp) == (qn, qp)
    vv = v.clone().requires_grad_()
    out = q(vv)
    # forward: integer codes in [-Q_N, Q_P] times the step
    sv = s.view(-1, 1, 1, 1) if per_channel else s
    want = torch.round(torch.clamp(v / sv, -qn, qp)) * sv
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    levels = (out / sv).round()
    assert levels.min() == -qn and levels.max() == qp  # both ends reached
    out.backward(grad)
    gv, gs = ref_grads(grad, v, s, qn, qp, g, per_channel)
    r = v / sv
    assert (r < -qn).any() and (r > qp).any() and ((r > -qn) & (r < qp)).any()  # all 3 cases
    torch.testing.assert_close(vv.grad, gv, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.step.grad, gs, rtol=1e-10, atol=1e-12)
    assert q.step.grad.shape == s.shape
    # the same against autograd of the paper's formulation
    s2 = s.clone().requires_grad_()
    v2 = v.clone().requires_grad_()
    ref = ref_autograd(v2, s2, qn, qp, g, per_channel)
    ref.backward(grad)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(vv.grad, v2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.step.grad, s2.grad, rtol=1e-10, atol=1e-12)


def test_gradient_scale_is_applied():
    """The step gradient without g is sqrt(N * Q_P) times larger: g is not 1."""
    v, s, grad = _data("unsigned", 4)
    s = s.clone().requires_grad_()
    L.lsq_quantize(v, s, 0, 15, 1.0).backward(grad)
    unscaled = s.grad.clone()
    s.grad = None
    g = L.grad_scale(v[0].numel(), 15)
    assert g == pytest.approx(1 / math.sqrt(48 * 15))
    L.lsq_quantize(v, s, 0, 15, g).backward(grad)
    torch.testing.assert_close(s.grad, unscaled * g)
    assert unscaled.abs() > 0


def test_boundaries_are_inside():
    """r = -Q_N and r = Q_P exactly: input gradient 1, step gradient the (zero) rounding error."""
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([-4.0, -1.0, 0.0, 0.2, 3.5, 4.0], dtype=torch.float64, requires_grad=True)
    out = L.lsq_quantize(v, s, 8, 7, 1.0)  # r = -8, -2, 0, 0.4, 7, 8
    assert out.tolist() == [-4.0, -1.0, 0.0, 0.0, 3.5, 3.5]
    out.backward(torch.ones_like(v))
    assert v.grad.tolist() == [1, 1, 1, 1, 1, 0]
    assert s.grad.item() == pytest.approx(0 + 0 + 0 + (0 - 0.4) + 0 + 7)


def test_bfloat16_inputs_are_quantized_in_fp32():
    x = torch.randn(4, 8, 5, 5) * 3
    q = _module("unsigned", 8, torch.tensor(0.02))
    out = q(x.bfloat16().requires_grad_())
    assert out.dtype == torch.bfloat16
    want = torch.round(torch.clamp(x.bfloat16().float() / 0.02, 0, 255)) * 0.02
    assert torch.equal(out, want.bfloat16())
    out.float().sum().backward()
    assert q.step.grad.dtype == torch.float32 and torch.isfinite(q.step.grad)


# ---------------------------------------------------------------- initialisation
@pytest.mark.parametrize("bits", BITS)
def test_weight_step_starts_at_twice_the_mean_magnitude_per_channel(bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight[2] *= 10  # channels differ
    layer = QConv2d.from_float(conv, weight_quantizer({"kind": "lsq", "bits": bits}))
    qp = bounds("weight", bits)[1]
    want = 2 * conv.weight.detach().abs().mean((1, 2, 3)) / math.sqrt(qp)
    wq = layer.weight_quant
    assert wq.step.shape == (6,) and bool(wq.initialized)
    torch.testing.assert_close(wq.step.detach(), want)
    assert wq.step[2] > 5 * wq.step[0]
    linear = QLinear.from_float(nn.Linear(5, 3), LSQWeight(bits))
    want = 2 * linear.weight.detach().abs().mean(1) / math.sqrt(qp)
    torch.testing.assert_close(linear.weight_quant.step.detach(), want)


def test_an_unattached_weight_quantizer_starts_at_its_first_forward():
    w = torch.randn(3, 10)
    q = LSQWeight(4).eval()
    assert q.step.numel() == 0 and not q.initialized
    q(w)
    torch.testing.assert_close(q.step.detach(), 2 * w.abs().mean(1) / math.sqrt(7))
    assert bool(q.initialized)


@pytest.mark.parametrize("signed", [False, True])
def test_act_step_starts_from_the_first_training_batch(signed):
    torch.manual_seed(0)
    q = act_quantizer({"kind": "lsq", "bits": 4, "signed": signed})
    x1, x2 = torch.randn(8, 4, 6, 6) + 0.3, torch.randn(8, 4, 6, 6) * 5
    q.eval()(x1)  # evaluation never initialises
    assert q.step.item() == 1.0 and not q.initialized
    q.train()(x1)
    qp = 7 if signed else 15
    seen = x1.abs() if signed else x1.clamp_min(0)  # unsigned: the ReLU output it replaces
    assert q.step.item() == pytest.approx(2 * seen.mean().item() / math.sqrt(qp), rel=1e-6)
    first = q.step.item()
    q(x2)  # once only
    assert q.step.item() == first and bool(q.initialized)


def test_a_batch_with_nothing_positive_still_gets_a_step():
    q = LSQAct(4).train()
    x = -torch.rand(2, 3, 4, 4) - 0.5
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)


def test_all_zero_weights_quantize_to_zero():
    layer = QConv2d.from_float(nn.Conv2d(2, 2, 1), LSQWeight(4))
    with torch.no_grad():
        layer.weight.zero_()
    layer.weight_quant.init_step_(layer.weight)
    q = layer.quantized_weight()
    assert torch.equal(q, torch.zeros_like(q))
    assert layer.weight_quant.step.min() == L.TINY


# ---------------------------------------------------------------- models and checkpoints
def _trained(steps: int = 3, quant: dict = W4A4L) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model("resnet20", channels=[8] * 9)
    quantize_(model, quant)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _steps(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".step")}


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_quantize_learns_the_steps_of_a_zoo_model():
    torch.manual_seed(0)
    model = create_model("resnet20", channels=[8] * 9)
    quantize_(model, W4A4L)
    weights = [m for m in model.modules() if isinstance(m, LSQWeight)]
    acts = list({id(q): q for q in act_quantizers(model) if isinstance(q, LSQAct)}.values())
    assert len(weights) == 18 and len(acts) == 19  # first conv and classifier stay float
    params = {id(p) for p in model.parameters()}
    assert all(id(q.step) in params for q in weights + acts)
    # the optimizer of the training loop: steps (1-d and 0-d) without weight decay
    opt = build_optimizer(model, TrainConfig(weight_decay=5e-4))
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(q.step) in no_decay for q in weights + acts)
    model.train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model(x)  # the first batch initialises the activation steps
    before = _steps(model)
    assert all(bool(q.initialized) for q in weights + acts)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(q.step.grad is not None and q.step.grad.abs().sum() > 0 for q in weights)
        assert all(q.step.grad is not None and torch.isfinite(q.step.grad) for q in acts)
        opt.step()
        losses.append(loss.item())
    after = _steps(model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) == len(before) == 37
    assert losses[-1] < losses[0], losses
    assert bit_widths(model) == (4, 4) and applied_label(model) == "w4a4l"


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_a_rebuilt_model_keeps_its_steps_and_computes_the_same(tmp_path):
    model, _ = _trained()
    model.eval()
    state = checkpoint_state(model)
    assert any(k.endswith("weight_quant.step") for k in state["model"])
    assert any(k.endswith("fn.initialized") for k in state["model"])
    back = model_from_checkpoint(state).eval()
    trained, rebuilt = _steps(model), _steps(back)
    assert trained.keys() == rebuilt.keys()
    assert all(torch.equal(trained[k], rebuilt[k]) for k in trained)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), back(x))
    # a training batch on the rebuilt model does not start the steps again
    back.train()(x)
    assert all(torch.equal(trained[k], v) for k, v in _steps(back).items())
    # what a fresh quantize_ would give instead (so the test above can fail)
    fresh = quantize_(create_model("resnet20", channels=[8] * 9), W4A4L)
    fresh.load_state_dict({k: v for k, v in state["model"].items() if ".step" not in k}, False)
    assert not all(torch.equal(trained[k], v) for k, v in _steps(fresh).items())


def test_the_float_model_drops_the_quantizers():
    model, _ = _trained(1)
    to_float(model)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".step")]
    assert not any(isinstance(m, LSQAct | LSQWeight) for m in model.modules())


def test_pruned_channels_keep_their_steps():
    layer = QConv2d.from_float(nn.Conv2d(3, 5, 3), LSQWeight(4))
    steps = layer.weight_quant.step.detach().clone()
    idx = torch.tensor([0, 3, 4])
    layer.weight_quant.keep_out_channels_(idx)
    assert torch.equal(layer.weight_quant.step.detach(), steps[idx])
    with pytest.raises(RuntimeError, match="LSQ weight step has 3 channels but the weight 5"):
        layer.quantized_weight()


def test_storage_counts_the_bits_and_one_step_per_channel():
    layer = QConv2d.from_float(nn.Conv2d(8, 6, 3), LSQWeight(3))
    assert layer.storage_bytes() == math.ceil(6 * 8 * 9 * 3 / 8) + 6 * 4


# ---------------------------------------------------------------- config
def test_lsq_is_a_kind_of_both():
    assert "lsq" in WEIGHT_KINDS and "lsq" in ACT_KINDS
    w, a = weight_quantizer({"kind": "lsq", "bits": 3}), act_quantizer({"kind": "lsq", "bits": 5})
    assert (w.kind, w.bits, w.scaled) == ("lsq", 3, True)
    assert (a.kind, a.bits, a.scaled, a.signed) == ("lsq", 5, False, False)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            {"weight": {"kind": "lsq", "bits": 1}},
            r"^quant\.weight\.bits=1 is invalid: expected an integer from 2 to 8 for kind=lsq",
        ),
        ({"weight": {"kind": "lsq", "bits": 9}}, r"^quant\.weight\.bits=9 .* 2 to 8 for kind=lsq"),
        ({"weight": {"kind": "lsq"}}, r"^quant\.weight\.bits=None .* 2 to 8 for kind=lsq"),
        ({"act": {"kind": "lsq", "bits": 16}}, r"^quant\.act\.bits=16 .* 2 to 8 for kind=lsq"),
        ({"act": {"kind": "lsq", "bits": 4.0}}, r"^quant\.act\.bits=4 .* 2 to 8 for kind=lsq"),
        (
            {"act": {"kind": "lsq", "bits": 4, "signed": "yes"}},
            r"^quant\.act\.signed='yes' is invalid: expected true or false",
        ),
        (
            {"act": {"kind": "lsq", "bits": 4, "grad": "ste"}},
            r"^quant\.act\.grad='ste' is invalid: expected saturate_ste for kind=lsq",
        ),
        (
            {"act": {"kind": "lsq", "bits": 4, "step": 0.1}},
            r"^quant\.act\.step is not a known key: expected one of bits, clip_init, grad, kind,",
        ),
        (
            {"weight": {"kind": "lsq", "bits": 4, "signed": True}},
            r"^quant\.weight\.signed is not a known key",
        ),
    ],
)
def test_bad_lsq_settings_are_one_line(cfg, match):
    with pytest.raises(ConfigError, match=match) as e:
        quantize_(create_model("resnet20"), cfg)
    assert "\n" not in str(e.value)


def test_lsq_labels():
    assert quant_label(W4A4L) == "w4a4l"
    lsq_w = {"kind": "lsq", "bits": 4}
    assert quant_label({"weight": lsq_w, "act": {"kind": "pact", "bits": 4}}) == "w4la4p"
    assert quant_label({"weight": {"kind": "dorefa", "bits": 4}, "act": lsq_w}) == "w4da4l"
    assert quant_label({"weight": lsq_w, "act": {"kind": "fp32"}}) == "w4la32"
    assert (
        quant_label({"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": 4}})
        == "w4a4p"
    )


def test_codes_are_the_integers_the_forward_multiplies_by_the_step():
    """What packing and integer export store: round(clamp(w / s, -Q_N, Q_P)) per channel."""
    torch.manual_seed(0)
    q = LSQWeight(4)
    w = torch.randn(6, 3, 3, 3)
    q.attach_(w)
    codes = q.codes(w)
    s = q.step.detach().view(-1, 1, 1, 1)
    assert torch.equal(codes, torch.clamp(w / s, -8, 7).round())
    assert codes.min() >= -8 and codes.max() <= 7 and torch.equal(codes, codes.round())
    assert torch.allclose(codes * s, q(w).detach(), atol=1e-6)
