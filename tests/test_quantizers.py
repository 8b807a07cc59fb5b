"""The quantizer modules of compress.quant.quantizers: built directly (the library's spelling)
or from a config dict (the YAML's), with the defaults of the papers behind them."""

from __future__ import annotations

import pytest
import torch

from compress.quant import primitives as P
from compress.quant import quantizers as Q

WEIGHTS = [
    (lambda: Q.TernaryWeight(), {"kind": "ternary"}),
    (lambda: Q.BinaryWeight(), {"kind": "binary"}),
    (lambda: Q.DoReFaWeight(4), {"kind": "dorefa", "bits": 4}),
    (lambda: Q.LSQWeight(4), {"kind": "lsq", "bits": 4}),
    (lambda: Q.FP32Weight(), {"kind": "fp32"}),
]
ACTS = [
    (lambda: Q.DoReFaAct(4), {"kind": "dorefa", "bits": 4}),
    (lambda: Q.PACTAct(4), {"kind": "pact", "bits": 4}),
    (lambda: Q.TernaryAct(), {"kind": "ternary"}),
    (lambda: Q.BinaryAct(), {"kind": "binary"}),
    (lambda: Q.LSQAct(4), {"kind": "lsq", "bits": 4}),
    (lambda: Q.FP32Act(), {"kind": "fp32"}),
]


def _value_and_grad(q: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = q(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
    return y.detach(), x.grad


@pytest.mark.parametrize(("direct", "cfg"), WEIGHTS + ACTS, ids=lambda v: str(v))
def test_built_directly_or_from_a_config_with_only_its_kind_is_the_same(direct, cfg):
    build = Q.weight_quantizer if any(cfg is c for _, c in WEIGHTS) else Q.act_quantizer
    # the kind as YAML hands it over: a new string, not an interned literal
    a, b = direct(), build({**cfg, "kind": "".join(list(cfg["kind"]))})
    assert type(a) is type(b) and repr(a) == repr(b)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 3, 3) * 2
    for m in (a, b):
        m.train()
    ya, ga = _value_and_grad(a, x)
    yb, gb = _value_and_grad(b, x)
    assert torch.equal(ya, yb) and torch.equal(ga, gb)


def test_the_defaults_are_the_papers():
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    # TWN: delta = 0.7 mean|w| per output channel, scaled
    assert torch.equal(Q.weight_quantizer({"kind": "ternary"})(w), P.ternary_weight(w, 0.7, True))
    # XNOR-Net / BWN: sign(w) * mean|w| per output channel, not centred
    alpha = w.abs().mean((1, 2, 3), keepdim=True)
    assert torch.equal(
        Q.weight_quantizer({"kind": "binary"})(w), torch.where(w >= 0, alpha, -alpha)
    )
    # PACT's clip starts at 6 (ReLU6's), ternary activations cut at 0.5
    assert Q.act_quantizer({"kind": "pact", "bits": 4}).alpha.item() == 6.0
    t = torch.tensor([-0.6, -0.5, -0.4, 0.4, 0.5, 0.6])
    assert Q.act_quantizer({"kind": "ternary"})(t).tolist() == [-1, 0, 0, 0, 0, 1]
    # the saturating straight-through gradient: 1 inside DoReFa's [0, 1], 0 outside
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    Q.act_quantizer({"kind": "dorefa", "bits": 2})(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]
    # LSQ activations are unsigned: the clamp at 0 is the ReLU they replace
    lsq = Q.act_quantizer({"kind": "lsq", "bits": 4}).train()
    assert (lsq(torch.randn(64, 8)) >= 0).all() and not lsq.signed


def test_a_thinned_lsq_weight_refuses_a_wider_weight_in_one_line():
    q = Q.LSQWeight(4)
    q.attach_(torch.randn(8, 4, 3, 3))
    q.keep_out_channels_(torch.tensor([0, 2, 5]))
    assert q.step.shape == (3,)
    with pytest.raises(RuntimeError, match="LSQ weight step has 3 channels but the weight 8"):
        q(torch.randn(8, 4, 3, 3))


def test_storage_widths_and_reprs():
    """`bits` is the storage width bit_widths and the packed files report."""
    widths = [Q.TernaryWeight(), Q.TernaryAct(), Q.BinaryWeight(), Q.BinaryAct(), Q.LSQWeight(3)]
    assert [q.bits for q in widths] == [2, 2, 1, 1, 3]
    assert repr(Q.LSQWeight(4)) == "LSQWeight(bits=4, codes=[-8, 7], channels=0)"
    assert repr(Q.LSQAct(4, signed=True)) == "LSQAct(bits=4, signed=True, step=1)"


def test_lsq_weight_of_a_layer_with_one_output_channel():
    """The step gradient's scale counts the elements of one output channel."""
    w = torch.randn(1, 16, requires_grad=True)
    q = Q.LSQWeight(4)
    y = q(w)
    assert q.step.shape == (1,) and (y.detach() / q.step.detach()).round().abs().max() <= 8
    y.sum().backward()
    assert q.step.grad is not None and torch.isfinite(q.step.grad).all()
