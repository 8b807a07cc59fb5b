"""INT8 QAT (quant=int8_qat): per-channel int8 weights, uint8 activations on an EMA observer,
straight-through gradients, BN statistics frozen after quant.freeze_bn_epoch epochs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from compress import engine
from compress.config import validate_quant
from compress.engine import Callback
from compress.errors import ConfigError
from compress.fuse import plan_fusion
from compress.models import create_model
from compress.quant import QConv2d, applied_label, bit_widths, quant_label, quantize_, to_float
from compress.quant.int8 import (
    Int8Act,
    Int8Weight,
    act_codes,
    act_qparams,
    bn_freeze_hook,
    fake_quant_affine,
    fold_bn_weight,
    int8_weight,
    int8_weight_codes,
)
from compress.spec import model_from_checkpoint
from compress.tasks.train import run as run_training
from tests.custom_models import small_cnn
from tests.test_config import compose_cfg
from tests.test_engine import tiny_cfg

INT8 = {"name": "int8_qat", "weight": {"kind": "int8"}, "act": {"kind": "int8"}}


def _conv_bn(c: int = 6) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Flatten()
    )


# ---------------------------------------------------------------- weights
def test_weights_are_scale_times_int8_per_channel():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).view(-1, 1, 1, 1)
    w[3] = 0.0  # an all-zero channel quantizes to zeros, not NaN
    q = Int8Weight()(w)
    codes, scale = int8_weight_codes(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127 and scale.shape == (8,)
    assert torch.equal(q, codes.float() * scale.view(-1, 1, 1, 1))  # exactly scale * integer
    for c in range(8):
        assert q[c].unique().numel() <= 255
        if c != 3:
            assert int(codes[c].abs().max()) == 127  # the channel's max maps to +-127
            assert torch.allclose(scale[c], w[c].abs().max() / 127)
    assert (q - w).abs().le(scale.view(-1, 1, 1, 1) / 2 + 1e-12).all()
    assert torch.equal(q[3], torch.zeros_like(q[3]))
    lin = torch.randn(5, 7)  # linear weights: per output row
    assert torch.equal(
        int8_weight(lin), int8_weight_codes(lin)[0].float() * int8_weight_codes(lin)[1][:, None]
    )


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    g = torch.randn_like(w)
    (Int8Weight()(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_per_channel_quantization_commutes_with_the_bn_fold():
    """Q(w * gamma / sigma) = Q(w) * gamma / sigma: why a frozen BN after the quantized conv is
    the paper's folded weight quantization (compress/quant/int8.py's docstring)."""
    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -1.2, 2.0, 0.01, -0.3, 1.0]))
        bn.running_var.uniform_(0.2, 3.0)
        bn.running_mean.normal_()
        bn.bias.normal_()
    folded_q = int8_weight(fold_bn_weight(w, bn))
    assert torch.allclose(folded_q, fold_bn_weight(int8_weight(w), bn), rtol=1e-5, atol=1e-7)
    # the frozen conv -> BN computes the folded conv plus BN's bias shift
    x = torch.randn(2, 3, 8, 8)
    conv = QConv2d.from_float(nn.Conv2d(3, 6, 3, padding=1, bias=False), Int8Weight())
    conv.weight.data.copy_(w)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias - bn.running_mean * s).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(bn(conv(x)), F.conv2d(x, folded_q, padding=1) + shift, atol=1e-5)


# ---------------------------------------------------------------- activations
def test_activation_levels_and_exact_zero():
    lo, hi = torch.tensor(-1.3), torch.tensor(2.7)
    scale, zp = act_qparams(lo, hi)
    assert float(zp) == round(float(zp)) and 0 <= float(zp) <= 255
    x = torch.cat([torch.linspace(-3, 4, 5001), torch.zeros(3)])
    q = fake_quant_affine(x, scale, zp)
    assert q.unique().numel() <= 256
    assert torch.equal(q[x == 0], torch.zeros(3))  # 0.0 is exactly the zero point
    codes = act_codes(x, scale, zp)
    assert codes.dtype == torch.uint8
    assert torch.equal(q, (codes.float() - zp) * scale)  # exactly (code - zp) * scale
    assert q.min() >= lo - scale and q.max() <= hi + scale
    # a range that excludes 0 is widened to contain it
    s2, z2 = act_qparams(torch.tensor(0.5), torch.tensor(3.0))
    assert float(z2) == 0 and torch.equal(fake_quant_affine(torch.zeros(1), s2, z2), torch.zeros(1))


def test_int8_act_is_a_quantized_relu_with_at_most_256_levels():
    torch.manual_seed(0)
    act = Int8Act().train()
    x = torch.randn(4, 8, 6, 6) * 3
    y = act(x)
    assert y.unique().numel() <= 256 and (y >= 0).all()
    assert torch.equal(y[x <= 0], torch.zeros_like(y[x <= 0]))  # ReLU zeros stay exact
    scale, zp = act.qparams()
    assert float(zp) == 0  # after a ReLU the range starts at 0
    assert torch.allclose(y, torch.relu(x), atol=float(scale) / 2 + 1e-6)


def test_ema_observer_updates_in_training_only():
    act = Int8Act()
    assert not bool(act.initialized)
    assert {"min_val", "max_val", "initialized"} <= set(act.state_dict())
    act.train()
    act(torch.full((10,), 2.0))
    assert bool(act.initialized) and float(act.max_val) == 2.0  # the first batch sets it
    act(torch.full((10,), 4.0))
    # PyTorch's MovingAverageMinMaxObserver's averaging constant, 0.01
    assert float(act.max_val) == pytest.approx(2.0 * 0.99 + 4.0 * 0.01)
    frozen = act.max_val.clone(), act.min_val.clone()
    act.eval()
    y = act(torch.full((10,), 100.0))
    assert torch.equal(act.max_val, frozen[0]) and torch.equal(act.min_val, frozen[1])
    assert float(y.max()) == pytest.approx(float(frozen[0]), rel=1e-2)  # clipped to the range


def test_activation_gradient_is_zero_outside_the_clipped_range():
    act = Int8Act().eval()  # range [0, 6] before any training batch
    x = torch.tensor([-1.0, 0.5, 3.0, 5.9, 7.0, 50.0], requires_grad=True)
    act(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# The range [lo, hi] = [-1, 2.984375] has scale 1/64 and zero point 64 exactly (255 steps of
# 1/64 from -64/64), so every probe below is exact in fp32 and x / scale lands where the name
# says. `inside` is decided on the rounded level (as torch.fake_quantize_per_tensor_affine):
# within half a step outside the range a value rounds onto the end code without being clamped
# (gradient 1); nearer the next code it is clamped (gradient 0).
LO, HI, STEP = -1.0, 2.984375, 1 / 64
EDGE_PROBES = {  # x: the gradient fake_quant_affine passes
    LO - 10: 0.0,
    LO - STEP: 0.0,  # code -1: clamped to 0
    LO - 0.75 * STEP: 0.0,  # rounds to code -1: clamped
    LO - 0.25 * STEP: 1.0,  # rounds to code 0 (lo)
    LO: 1.0,  # code 0, the bottom of the range
    LO + 0.25 * STEP: 1.0,
    LO + STEP: 1.0,
    0.0: 1.0,  # the zero point
    HI - STEP: 1.0,
    HI - 0.25 * STEP: 1.0,  # rounds to code 255
    HI: 1.0,  # code 255, the top of the range
    HI + 0.25 * STEP: 1.0,  # rounds to code 255
    HI + 0.75 * STEP: 0.0,  # rounds to code 256: clamped
    HI + STEP: 0.0,
    HI + 10: 0.0,
}


def test_activation_gradient_at_and_around_both_ends_of_the_range():
    scale, zp = act_qparams(torch.tensor(LO), torch.tensor(HI))
    assert (float(scale), float(zp)) == (STEP, 64.0)  # exact: the probes sit where intended
    x = torch.tensor(list(EDGE_PROBES), requires_grad=True)
    # the float32 neighbours of lo and hi (one ulp inside and outside): the end codes
    lo, hi = torch.tensor(LO), torch.tensor(HI)
    ulps = torch.stack(
        [torch.nextafter(v, v + d) for v in (lo, hi) for d in (-1.0, 1.0)]
    ).requires_grad_()
    fake_quant_affine(x, scale, zp).sum().backward()
    fake_quant_affine(ulps, scale, zp).sum().backward()
    assert dict(zip(EDGE_PROBES, x.grad.tolist(), strict=True)) == EDGE_PROBES
    assert ulps.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert act_codes(ulps, scale, zp).tolist() == [0, 0, 255, 255]
    # PyTorch's own fake quantization passes its gradient on exactly the same values
    for probe in (x, ulps):
        ref = probe.detach().clone().requires_grad_()
        torch.fake_quantize_per_tensor_affine(ref, float(scale), int(zp), 0, 255).sum().backward()
        assert torch.equal(probe.grad, ref.grad)


def test_int8_act_gradient_at_the_top_of_its_observed_range():
    """Through the quantizer module: range [0, 6] before any training batch (scale 6/255, not
    exact, so the probes are a quarter step from the ends, far from any rounding tie)."""
    act = Int8Act().eval()
    scale, zp = act.qparams()
    s = float(scale)
    assert float(zp) == 0.0
    top = torch.tensor(6.0)
    x = torch.stack(
        [
            torch.tensor(0.25 * s),  # just above the bottom (0, the zero point): 1
            torch.tensor(-0.25 * s),  # below 0: the ReLU's zero gradient
            top - s,
            torch.nextafter(top, torch.tensor(0.0)),
            top,  # the top of the range, code 255: still passes the gradient
            torch.nextafter(top, torch.tensor(7.0)),
            top + 0.25 * s,
            top + 0.75 * s,  # rounds past code 255: clamped
            top + s,
        ]
    ).requires_grad_()
    assert act_codes(x.detach()[2:7], scale, zp).tolist() == [254, 255, 255, 255, 255]
    act(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------- models and config
def test_any_model_relu_sites_bit_widths_label_fuse_and_back():
    model = quantize_(small_cnn(), {**INT8, "keep_first_last": False})
    assert bit_widths(model) == (8, 8) and applied_label(model) == "int8_qat"
    assert sum(isinstance(m, Int8Act) for m in model.modules()) == 4
    model.train()(torch.randn(4, 3, 16, 16))
    assert len(plan_fusion(model.eval()).folds) == 4  # Int8Act is a leaf: conv -> BN found
    to_float(model)
    assert not any(isinstance(m, Int8Act | QConv2d) for m in model.modules())
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 4


def test_labels_and_config_checks():
    assert quant_label(INT8) == "int8_qat"
    assert quant_label({"weight": {"kind": "int8"}, "act": {"kind": "fp32"}}) == "wi8a32"
    validate_quant({**INT8, "freeze_bn_epoch": None})
    validate_quant({**INT8, "freeze_bn_epoch": 1})
    for bad in (0, -2, 1.5, "x", True):
        with pytest.raises(ConfigError) as e:
            validate_quant({**INT8, "freeze_bn_epoch": bad})
        assert "quant.freeze_bn_epoch=" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="quant.freeze_bn_epoch=0 is invalid: expected null or"):
        validate_quant({**INT8, "freeze_bn_epoch": 0})


def test_freeze_bn_config_error_from_the_command_line_shape(tmp_path):
    cfg = tiny_cfg(epochs=1)
    cfg["quant"] = {**INT8, "freeze_bn_epoch": 0}
    with pytest.raises(ConfigError, match="quant.freeze_bn_epoch=0"):
        run_training(cfg, tmp_path)


def test_bn_freeze_hook_freezes_statistics_for_good():
    torch.manual_seed(0)
    model = quantize_(_conv_bn(), {**INT8, "keep_first_last": False})
    bn = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        model.train()  # what the loop does at the start of every epoch
        loss = model(torch.randn(8, 3, 6, 6) * 2 + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    hook = bn_freeze_hook(model, 2)
    step()
    assert not hook(1)  # one epoch done: still learning statistics
    before = bn.running_mean.clone()
    step()
    assert not torch.equal(bn.running_mean, before)
    assert hook(2) and hook(3)  # frozen from epoch 2 on (idempotent)
    frozen = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    weight = bn.weight.detach().clone()
    step()
    assert torch.equal(bn.running_mean, frozen[0]) and torch.equal(bn.running_var, frozen[1])
    assert torch.equal(bn.num_batches_tracked, frozen[2])
    assert not torch.equal(bn.weight, weight)  # gamma / beta still train
    x = torch.randn(4, 3, 6, 6)
    model.train()
    with torch.no_grad():
        y_train = model(x)
        y_eval = model.eval()(x)
    assert torch.equal(y_train, y_eval)  # training uses the running statistics too


# ---------------------------------------------------------------- a whole run
@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_int8_qat_run_learns_freezes_bn_and_round_trips(tmp_path):
    class Spy(Callback):
        def __init__(self) -> None:
            self.model: nn.Module | None = None
            self.stats: list[torch.Tensor] = []

        def on_epoch_end(self, epoch, model, writer):
            self.model = model
            bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            self.stats.append(torch.cat([b.running_mean.clone() for b in bns]))

    cfg = tiny_cfg(epochs=3)
    cfg["quant"] = {**INT8, "freeze_bn_epoch": 2}
    spy = Spy()
    metrics = run_training(cfg, tmp_path, callbacks=[spy])
    hist = metrics["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert metrics["quant"] == "int8_qat" and (metrics["w_bits"], metrics["a_bits"]) == (8, 8)
    assert not torch.equal(spy.stats[0], spy.stats[1])  # epoch 2 still learns statistics
    assert torch.equal(spy.stats[1], spy.stats[2])  # frozen after epoch 2
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    observers = [k for k in state["model"] if k.endswith(".initialized")]
    assert observers and all(bool(state["model"][k]) for k in observers)
    assert any(k.endswith(".max_val") for k in state["model"])
    rebuilt = model_from_checkpoint(state)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), spy.model.eval()(x))
    acts = [m for m in rebuilt.modules() if isinstance(m, Int8Act)]
    assert acts and all(float(a.max_val) > 0 for a in acts)


def test_int8_qat_config_composes():
    cfg = compose_cfg("train", ["quant=int8_qat"])
    assert cfg.quant.name == "int8_qat" and cfg.quant.weight.kind == "int8"
    assert cfg.quant.freeze_bn_epoch == 3 and cfg.quant.keep_first_last is True
    q = OmegaConf.to_container(cfg.quant)
    assert quant_label(q) == "int8_qat"
    model = quantize_(create_model("resnet20"), q)
    assert bit_widths(model) == (8, 8)
    bad = OmegaConf.to_container(
        compose_cfg("train", ["quant=int8_qat", "quant.freeze_bn_epoch=0"])
    )
    with pytest.raises(ConfigError, match="quant.freeze_bn_epoch=0"):
        validate_quant(bad["quant"])


@pytest.mark.slow  # heavy: tens of seconds on 2 cores (make test-slow)
def test_resumed_past_the_freeze_equals_uninterrupted(tmp_path, monkeypatch):
    """A run resumed after the freeze epoch is frozen from its first step (observers and BN
    statistics come back from last.pt), so it ends with the uninterrupted run's weights."""
    cfg = tiny_cfg(epochs=3)
    cfg["quant"] = {**INT8, "freeze_bn_epoch": 1}
    run_training(cfg, tmp_path / "full")
    calls = {"n": 0}
    real_evaluate = engine.evaluate

    def interrupt_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "broken")
    monkeypatch.setattr(engine, "evaluate", real_evaluate)
    run_training({**cfg, "resume": True}, tmp_path / "broken")
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_zero_point_rounds_to_the_nearest_code():
    from compress.quant.int8 import act_qparams

    # lo / scale = -73.2: the nearest code is 73 (flooring would give 74)
    lo, hi = torch.tensor(-73.2 / 255), torch.tensor(1 - 73.2 / 255)
    scale, zp = act_qparams(lo, hi)
    assert scale.item() == pytest.approx(1 / 255) and zp.item() == 73
    assert act_qparams(torch.tensor(-76.8 / 255), torch.tensor(1 - 76.8 / 255))[1].item() == 77


def test_freezing_counts_and_touches_only_batchnorms():
    from compress.quant.int8 import freeze_bn_

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)
    ).train()
    assert freeze_bn_(model) == 2
    assert model[0].training and model[2].training  # conv and ReLU stay as they were
    assert not model[1].training and model[1].momentum == 0.0
    assert not hasattr(model[0], "bn_frozen")
    assert freeze_bn_(model) == 0  # idempotent
