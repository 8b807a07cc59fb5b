"""quantize_ / to_float, QConv2d equivalences, config errors, and QAT on every combination."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.data import TensorLoader, load_dataset
from compress.errors import ConfigError
from compress.metrics import size_bytes
from compress.models import create_model
from compress.models.blocks import Activation
from compress.quant import QConv2d, QLinear, bit_widths, quant_label, quantize_, to_float
from compress.quant.api import execution_order, is_quantized
from compress.quant.quantizers import BinaryAct, DoReFaAct

KINDS = {
    "fp32": {"kind": "fp32"},
    "8": {"kind": "dorefa", "bits": 8},
    "4": {"kind": "dorefa", "bits": 4},
    "2": {"kind": "dorefa", "bits": 2},
    "ternary": {"kind": "ternary"},
    "binary": {"kind": "binary"},
}


def _runtime(s: str) -> str:
    """The same characters as a new string, as YAML hands them over (not an interned literal)."""
    return "".join(list(s))


def test_labels_of_mixed_kinds_name_each_part():
    """No two settings share a label: a mixed pair is never taken for int8_qat or w*a*l."""
    lsq4, int8 = {"kind": "lsq", "bits": 4}, {"kind": "int8"}
    assert quant_label({"weight": lsq4, "act": int8}) == "w4lai8"
    assert quant_label({"weight": {"kind": "ternary"}, "act": lsq4}) == "wta4l"
    assert quant_label({"weight": int8, "act": lsq4}) == "wi8a4l"
    fp32 = {"weight": {"kind": _runtime("fp32")}, "act": {"kind": _runtime("fp32")}}
    assert quant_label(fp32) == "fp32" and not is_quantized(fp32)


@pytest.mark.parametrize(
    ("layers", "shown"),
    [(2, "0, 1)"), (6, "0, 1, 2, 3, 4, 5)"), (7, "0, 1, 2, 3, 4, 5, ...)")],
)
def test_a_misspelt_kept_layer_lists_the_first_six(layers, shown):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    msg = "quant.keep: the model has no conv or linear layer named 'nope' (its layers: " + shown
    with pytest.raises(ConfigError) as e:
        quantize_(model, {"weight": {"kind": "dorefa", "bits": 4}, "keep": ["nope"]})
    assert str(e.value) == msg


def test_an_untraceable_model_is_named_with_the_first_line_of_the_reason(caplog):
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            if isinstance(x, torch.fx.Proxy):
                raise RuntimeError("no tracing here\nsecond line\nthird line")
            return self.b(self.a(x))

    with caplog.at_level("WARNING", logger="compress.quant.api"):
        assert execution_order(Untraceable(), ["b", "a"]) == ["b", "a"]
    (line,) = [r.getMessage() for r in caplog.records if "cannot trace" in r.getMessage()]
    assert line == (
        "quant: cannot trace Untraceable (no tracing here); "
        "first / last layers taken in registration order"
    )


def test_qconv_with_fp32_settings_equals_conv_exactly():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    q = QConv2d.from_float(conv)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(q(x), conv(x))
    assert q.weight is conv.weight and q.bias is conv.bias
    lin = nn.Linear(5, 3)
    assert torch.equal(QLinear.from_float(lin)(torch.ones(2, 5)), lin(torch.ones(2, 5)))


def test_quantize_and_to_float_round_trip():
    model = create_model("nin")
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32)
    ref = model.eval()(x)
    cfg = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}
    quantize_(model, cfg)
    qconvs = [n for n, m in model.named_modules() if isinstance(m, QConv2d)]
    assert len(qconvs) == 7  # 9 convs, first and classifier kept
    assert "features.0.conv" not in qconvs and "classifier.conv" not in qconvs
    assert all(isinstance(m.fn, DoReFaAct) for m in model.modules() if isinstance(m, Activation))
    assert not torch.allclose(model(x), ref)
    assert set(model.state_dict()) == set(create_model("nin").state_dict())
    to_float(model)
    assert not any(isinstance(m, QConv2d) for m in model.modules())
    assert all(p is params[n] for n, p in model.named_parameters())
    assert torch.equal(model(x), ref)


def test_keep_layers_by_name_and_unknown_name():
    model = create_model("resnet20")
    quantize_(model, {"weight": {"kind": "binary"}, "keep": ["layers.0.conv1"]})
    assert isinstance(model.layers[0].conv1, nn.Conv2d)
    assert not isinstance(model.layers[0].conv1, QConv2d)
    assert isinstance(model.layers[0].conv2, QConv2d) and not isinstance(model.fc, QLinear)
    with pytest.raises(
        ConfigError, match="quant.keep: the model has no conv or linear layer named 'layers.0.nope'"
    ):
        quantize_(
            create_model("resnet20"), {"weight": {"kind": "binary"}, "keep": ["layers.0.nope"]}
        )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"weight": {"kind": "dorefa", "bits": 1}}, "quant.weight.bits=1 is invalid"),
        ({"weight": {"kind": "dorefa", "bits": 17}}, "an integer from 2 to 16"),
        ({"act": {"kind": "dorefa", "bits": 0}}, "quant.act.bits=0 is invalid"),
        ({"weight": {"kind": "int3"}}, "quant.weight.kind='int3' is invalid: expected one of"),
        ({"act": {"kind": "binary", "grad": "magic"}}, "quant.act.grad='magic'"),
        ({"weight": {"kind": "ternary", "gap": 0}}, "quant.weight.gap=0 is invalid"),
        ({"weight": {"kind": "ternary", "gpa": 0.5}}, "quant.weight.gpa is not a known key"),
    ],
)
def test_bad_quant_config(cfg, message):
    with pytest.raises(ConfigError, match=message):
        quantize_(create_model("resnet20"), cfg)


def test_size_bytes_counts_real_bit_widths():
    model = create_model("nin")
    fp32 = size_bytes(model)
    quantize_(model, {"weight": {"kind": "binary", "scale": False}})
    q_w = sum(m.weight.numel() for m in model.modules() if isinstance(m, QConv2d))
    assert size_bytes(model) == fp32 - 4 * q_w + q_w // 8
    assert bit_widths(model) == (1, 32)


def test_binary_activation_model_emits_signs():
    model = create_model("nin", order="bacp")
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    seen = []
    for m in model.modules():
        if isinstance(m, Activation):
            assert isinstance(m.fn, BinaryAct)
            m.register_forward_hook(lambda _m, _i, out: seen.append(out))
    model.eval()(torch.randn(2, 3, 32, 32))
    assert seen and all(set(o.unique().tolist()) <= {-1.0, 1.0} for o in seen)


@pytest.fixture(scope="module")
def batches():
    ds = load_dataset("synthetic", num_train=64, num_test=8)
    loader = TensorLoader(ds.train, 32, ds.mean, ds.std, train=True)
    return list(loader)


PACT = {"pact4": {"kind": "pact", "bits": 4}, "pact2": {"kind": "pact", "bits": 2}}


@pytest.mark.parametrize(
    ("w", "a"), [*itertools.product(KINDS, KINDS), *itertools.product(["4", "2"], PACT)]
)
def test_every_combination_trains_with_falling_loss(w, a, batches):
    torch.manual_seed(0)
    model = create_model("resnet20", channels=[8] * 9)
    quantize_(model, {"weight": KINDS[w], "act": {**KINDS, **PACT}[a]})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_pact_activation_learns_its_clip_and_is_labelled():
    torch.manual_seed(0)
    model = create_model("resnet20")
    cfg = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": 4}}
    quantize_(model, cfg)
    alphas = [p for n, p in model.named_parameters() if n.endswith("alpha")]
    assert alphas and all(a.item() == 6.0 for a in alphas)
    opt = torch.optim.SGD(alphas, lr=0.1)
    F.cross_entropy(model(torch.randn(4, 3, 32, 32) * 10), torch.tensor([0, 1, 2, 3])).backward()
    assert all(a.grad is not None and torch.isfinite(a.grad) for a in alphas)
    opt.step()
    assert any(a.item() != 6.0 for a in alphas)  # the clip is learned
    assert quant_label(cfg) == "w4a4p" and bit_widths(model) == (4, 4)


@pytest.mark.parametrize(
    ("act", "match"),
    [
        ({"kind": "pact", "bits": 1}, "quant.act.bits"),
        ({"kind": "pact", "bits": 4, "clip_init": 0}, "quant.act.clip_init"),
        ({"kind": "pact", "bits": 4, "clip_init": True}, "quant.act.clip_init"),
        ({"kind": "pact", "bits": 4, "clip_init": float("inf")}, "quant.act.clip_init"),
        ({"kind": "pact", "bits": 4, "grad": "soft_ste"}, "quant.act.grad"),
    ],
)
def test_pact_bad_input(act, match):
    with pytest.raises(ConfigError, match=match):
        quantize_(create_model("resnet20"), {"act": act})


def test_labels_compare_kinds_by_value():
    from compress.quant.api import quant_label

    # kinds read from a YAML file or built at run time are equal strings, not the same object
    int8, lsq = "".join(["in", "t8"]), "".join(["ls", "q"])
    assert (
        quant_label({"weight": {"kind": int8}, "act": {"kind": "".join(["in", "t8"])}})
        == "int8_qat"
    )
    same = {"weight": {"kind": lsq, "bits": 4}, "act": {"kind": "".join(["ls", "q"]), "bits": 4}}
    assert quant_label(same) == "w4a4l"
    assert quant_label({"weight": {"kind": "ternary"}, "act": {"kind": "ternary"}}) == "wtat"
