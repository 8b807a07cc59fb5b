"""quant.act.sites: which quantized layers read k-bit inputs (compress.quant.sites), and the
input quantizers that put the others on a grid. The check of "k-bit" here does not use the
module's analysis: it counts the distinct values each quantized layer really multiplies."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ConfigError
from compress.fuse import fuse_bn_
from compress.models import create_model
from compress.quant import QConv2d, quantize_, to_float
from compress.quant.api import bit_widths, input_report
from compress.quant.int8 import Int8Act
from compress.quant.quantizers import LSQAct, PACTAct
from compress.spec import checkpoint_state, model_from_checkpoint
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from zoo import levels_read  # noqa: E402  (distinct values each quantized layer multiplies)


def quant(kind: str = "lsq", bits: int = 4, sites: str = "inputs", weight: str = "lsq") -> dict:
    wcfg = {"kind": weight, "bits": bits} if weight in ("lsq", "dorefa") else {"kind": weight}
    acfg = {"kind": kind, "sites": sites} | ({"bits": bits} if kind != "int8" else {})
    return {"weight": wcfg, "act": acfg}


def tv(name: str) -> nn.Module:
    return create_model(name, source="torchvision", num_classes=10)


def warmed(model: nn.Module, shape=(3, 64, 64)) -> nn.Module:
    """One training-mode batch: LSQ steps and int8 ranges start from data, as in training."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    return model.eval()


# ---------------------------------------------------------------- what relu sites leave float
def test_relu_sites_leave_most_mobilenet_v3_inputs_float_and_say_why():
    model = tv("mobilenet_v3_small")
    quantize_(model, quant(sites="relu"))
    report = input_report(model)
    floats = report["float_inputs"]
    assert (report["kbit_inputs"], len(floats)) == (13, 39)
    whys = {why.split(" (")[0] for why in floats.values()}
    assert {"a Hardswish output", "a product", "a sum", "a AdaptiveAvgPool2d output"} <= whys
    assert bit_widths(model) == (4, 4)  # what bit_widths alone cannot show
    levels = levels_read(warmed(model), torch.randn(2, 3, 64, 64))
    assert sum(v > 16 for v in levels.values()) >= 39 - 1  # the report is what they compute


def test_a_project_model_reads_k_bit_inputs_everywhere_but_behind_resnet9s_add():
    for name in ("nin", "resnet20", "vgg_small"):
        model = create_model(name)
        quantize_(model, quant("pact", sites="relu", weight="dorefa"))
        assert input_report(model)["float_inputs"] == {}, name
    model = create_model("resnet9", width=8)
    quantize_(model, quant("pact", sites="relu", weight="dorefa"))
    assert input_report(model)["float_inputs"] == {"5.0": "a sum (a residual stream)"}


# ---------------------------------------------------------------- sites=inputs
@pytest.mark.parametrize(
    "name",
    [
        "mobilenet_v3_small",
        pytest.param("efficientnet_b0", marks=pytest.mark.slow),
        pytest.param("regnet_y_400mf", marks=pytest.mark.slow),
        pytest.param("convnext_tiny", marks=pytest.mark.slow),
    ],
)
def test_input_sites_put_every_quantized_layer_on_a_4_bit_grid(name):
    model = tv(name)
    quantize_(model, quant())
    assert input_report(model)["float_inputs"] == {}
    levels = levels_read(warmed(model), torch.randn(2, 3, 64, 64))
    assert levels and max(levels.values()) <= 16, {k: v for k, v in levels.items() if v > 16}


def test_functional_relus_quantize_at_inputs_and_are_refused_at_relu_sites():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = F.relu(self.c1(x))
            x = torch.relu(self.c2(x))
            x = self.c3(x).relu()
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ConfigError, match="use quant.act.sites=inputs, nn.ReLU modules"):
        quantize_(Functional(), quant(sites="relu"))
    model = quantize_(Functional(), quant())
    # c1 and fc are kept float; c2 and c3 read ReLU outputs: unsigned quantizers
    assert isinstance(model.c2.input_quant, LSQAct) and not model.c2.input_quant.signed
    assert not model.c3.input_quant.signed
    assert max(levels_read(warmed(model, (3, 16, 16)), torch.randn(2, 3, 16, 16)).values()) <= 16


class Branches(nn.Module):
    """One BN output read by two convs (one tensor: one quantizer), a Hardswish (signed), a
    sigmoid gate of a ReLU (unsigned), an average pool of a ReLU (unsigned)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.hs, self.after_hs = nn.Hardswish(), nn.Conv2d(8, 8, 1)
        self.gate, self.after_gate = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.pooled, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = self.hs(self.a(x) + self.b(x))
        x = self.after_hs(x)
        r = torch.relu(x)
        g = r * torch.sigmoid(self.gate(r))
        y = self.after_gate(g)
        y = self.pooled(F.adaptive_avg_pool2d(torch.relu(y), 1))
        return self.fc(y.flatten(1))


def test_one_quantizer_per_tensor_signed_by_what_produces_it():
    model = quantize_(Branches(), quant())
    assert model.a.input_quant is model.b.input_quant  # the BN output, shared
    assert model.a.input_quant.signed  # a BN output can be negative
    assert model.after_hs.input_quant.signed  # Hardswish reaches -0.375
    assert not model.gate.input_quant.signed  # a ReLU output
    assert not model.after_gate.input_quant.signed  # ReLU x sigmoid
    assert not model.pooled.input_quant.signed  # the mean of a ReLU output
    keys = [k for k in model.state_dict() if "input_quant.step" in k]
    assert {"a.input_quant.step", "b.input_quant.step"} <= set(keys)
    # DoReFa / PACT are unsigned only: a signed input gets LSQ's signed quantizer, same bits
    pact = quantize_(Branches(), quant("pact", weight="dorefa"))
    assert isinstance(pact.gate.input_quant, PACTAct)
    assert isinstance(pact.a.input_quant, LSQAct) and pact.a.input_quant.signed
    assert pact.a.input_quant.bits == 4
    # int8: asymmetric ranges, negatives kept (no ReLU at an input)
    int8 = quantize_(
        Branches(), {"weight": {"kind": "int8"}, "act": {"kind": "int8", "sites": "inputs"}}
    )
    q = int8.a.input_quant
    assert isinstance(q, Int8Act) and not q.relu
    q.train()
    assert q(torch.tensor([-1.0, 2.0])).min() < 0


class SharedHead(nn.Module):
    """One head conv applied to two levels (an FPN's shared head): to float maps (a conv's
    outputs) and, after it, to ReLU outputs that its own ReLU quantizers put on grids."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.r0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.p3, self.p4 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head, self.relu, self.out = (
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 2, 1),
        )

    def forward(self, x):
        x = self.r0(self.stem(x))
        levels = [self.p3(x), self.p4(x)]
        outs = [self.out(self.relu(self.head(f))) for f in levels]
        return torch.cat([o.flatten(1) for o in outs], 1)


def test_a_layer_called_on_several_float_tensors_gets_its_own_input_quantizer():
    """Relu sites leave the shared head float and say why; input sites give it one quantizer
    of its own (signed: conv outputs), one scale over both calls, while `out`, called on two
    gridded ReLU outputs, needs none. Every quantized layer then multiplies 4-bit codes."""
    cfg = quant()
    cfg["keep_first_last"] = False
    relu = quantize_(SharedHead(), {**cfg, "act": {**cfg["act"], "sites": "relu"}})
    why = input_report(relu)["float_inputs"]
    assert why["head"].startswith("called at 2 places on different inputs, 2 of them float (")
    assert "out" not in why  # both calls read a ReLU quantizer's grid
    model = quantize_(SharedHead(), cfg)
    assert model.head.input_quant.signed and model.out._modules.get("input_quant") is None
    assert input_report(model)["float_inputs"] == {}
    assert max(levels_read(warmed(model, (3, 16, 16)), torch.randn(2, 3, 16, 16)).values()) <= 16


def test_input_quantizers_survive_a_checkpoint_fusion_and_float_conversion():
    built = create_model(source="custom", target="tests.test_quant_sites.Branches")
    model = warmed(quantize_(built, quant()), (3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        rebuilt = model_from_checkpoint(checkpoint_state(model)).eval()
        assert torch.equal(rebuilt(x), want)
        assert rebuilt.a.input_quant is rebuilt.b.input_quant
        fuse_bn_(rebuilt)
        assert torch.allclose(rebuilt(x), want, atol=1e-5)
        again = model_from_checkpoint(checkpoint_state(rebuilt)).eval()
        assert torch.equal(again(x), rebuilt(x))
    plain = to_float(model)
    assert not any(isinstance(m, LSQAct) for m in plain.modules())


def test_float_weights_with_quantized_inputs():
    model = quantize_(
        Branches(),
        {"weight": {"kind": "fp32"}, "act": {"kind": "lsq", "bits": 4, "sites": "inputs"}},
    )
    assert isinstance(model.a, QConv2d) and model.a.weight_bits == 32
    assert bit_widths(model) == (32, 4) and input_report(model)["float_inputs"] == {}


def test_an_untraceable_model_is_one_line_at_input_sites():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            x = self.c1(x)
            if x.sum() > 0:  # data-dependent control flow: not traceable
                x = x.relu()
            return self.fc(self.c2(x).mean((2, 3)))

    with pytest.raises(
        ConfigError, match=r"quant.act.sites=inputs: torch.fx cannot trace Branchy \("
    ):
        quantize_(Branchy(), quant())


def test_training_reports_and_warns_about_float_inputs(entry, tmp_path, caplog):
    import json

    common = ("model=resnet9", "model.width=8", "dataset=synthetic", "dataset.num_train=32")
    common += ("dataset.num_test=16", "schedule.epochs=1", "schedule.batch_size=16")
    common += ("schedule.progress=false", "device=cpu", "quant=w4a4p")
    with caplog.at_level(logging.WARNING, logger="compress.tasks.train"):
        code, _, err = entry("train", *common, run_dir=tmp_path / "relu")
    assert code == 0, err
    m = json.loads((tmp_path / "relu" / "metrics.json").read_text())
    assert m["kbit_input_layers"] == 6
    assert m["float_input_layers"] == {"5.0": "a sum (a residual stream)"}
    assert (
        "quant: 1 of 7 quantized layers read float inputs (5.0: a sum (a residual stream)); "
        "quant.act.sites=inputs quantizes them"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress.tasks.train"):
        code, _, err = entry("train", *common, "quant.act.sites=inputs", run_dir=tmp_path / "in")
    assert code == 0, err
    m = json.loads((tmp_path / "in" / "metrics.json").read_text())
    assert m["kbit_input_layers"] == 7 and m["float_input_layers"] == {}
    assert "read float inputs" not in caplog.text


def test_a_packed_file_keeps_the_input_quantizers():
    from compress.pack import pack_model, unpack_model

    model = create_model("resnet9", width=8)
    quantize_(model, quant())
    warmed(model, (3, 32, 32))
    back = unpack_model(pack_model(model)).eval()
    assert isinstance(back.get_submodule("5.0").input_quant, LSQAct)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_weight_only_quantization_reports_no_input_coverage(entry, tmp_path, caplog):
    import json

    args = ("model=resnet9", "model.width=8", "dataset=synthetic", "dataset.num_train=32")
    args += ("dataset.num_test=16", "schedule.epochs=1", "schedule.batch_size=16")
    args += ("schedule.progress=false", "device=cpu", "quant=wta32")
    with caplog.at_level(logging.WARNING, logger="compress.tasks.train"):
        code, _, err = entry("train", *args, run_dir=tmp_path)
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert "kbit_input_layers" not in m and "read float inputs" not in caplog.text


def test_sites_apply_to_every_quantized_activation_kind_and_not_to_fp32():
    dorefa = quantize_(Branches(), quant("dorefa", weight="dorefa"))
    assert dorefa.gate.input_quant.kind == "dorefa"  # unsigned: DoReFa's own [0, 1]
    assert isinstance(dorefa.a.input_quant, LSQAct) and dorefa.a.input_quant.signed
    binary = quantize_(
        Branches(), {"weight": {"kind": "binary"}, "act": {"kind": "binary", "sites": "inputs"}}
    )
    assert binary.a.input_quant.kind == "binary"  # sign(x): signed by nature
    plain = quantize_(
        Branches(), {"weight": {"kind": "binary"}, "act": {"kind": "fp32", "sites": "inputs"}}
    )
    assert not any(m._modules.get("input_quant") for m in plain.modules())


class _BNAfterHardswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.hs, self.relu, self.fc = nn.Hardswish(), nn.ReLU(), nn.Linear(8, 10)

    def forward(self, x):
        x = self.hs(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))  # c2 reads a Hardswish: an input quantizer
        x = self.relu(self.b3(self.c3(x)))  # c3 reads a quantized ReLU site: none needed
        return self.fc(x.mean((2, 3)))


def test_folding_a_bn_keeps_the_input_quantizer_of_its_conv():
    torch.manual_seed(0)
    model = warmed(quantize_(_BNAfterHardswish(), quant()), (3, 8, 8))
    with torch.no_grad():
        for bn in (model.b1, model.b2, model.b3):
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        fuse_bn_(model)
        assert type(model.c2) is QConv2d and isinstance(model.c2.input_quant, LSQAct)
        assert model.c2.weight_bits == 32  # the folded weight is float, its input quantized
        assert type(model.c3) is nn.Conv2d  # no input quantizer: a plain float conv
        assert torch.allclose(model(x), want, atol=1e-5)


def test_a_multi_line_trace_error_is_quoted_by_its_first_line():
    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            if isinstance(x, torch.fx.Proxy):
                raise TypeError("what went wrong\n  where it went wrong\n  more detail")
            return self.fc(self.c2(self.c1(x)).mean((2, 3)))

    with pytest.raises(ConfigError) as e:
        quantize_(Picky(), quant())
    assert "cannot trace Picky (what went wrong), so" in str(e.value)


class _Joins(nn.Module):
    """Concatenations of one quantizer's outputs and of two quantizers', a flatten, a sigmoid
    module, and (with keep_first_last=false) the image itself as a quantized layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Conv2d(4, 4, 1),
            nn.Conv2d(4, 4, 1),
        )
        self.r1, self.r2, self.sig = nn.ReLU(), nn.ReLU(), nn.Sigmoid()
        self.same, self.mixed, self.gated = (
            nn.Conv2d(8, 4, 1),
            nn.Conv2d(8, 4, 1),
            nn.Conv2d(4, 4, 1),
        )
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(4 * 4 * 4, 8), nn.Linear(8, 10)

    def forward(self, x):
        a = self.r1(self.c1(x))
        same = self.same(torch.cat([a, a], 1))  # one grid
        b = self.r2(self.c2(same))
        mixed = self.mixed(torch.cat([a, b], 1))  # two grids
        g = self.gated(self.sig(self.c3(mixed)))
        return self.fc2(self.fc1(torch.flatten(self.pool(self.r1(g)), 1)))


def test_joins_flattens_and_the_image_are_judged_as_they_are():
    model = quantize_(_Joins(), {**quant(sites="relu"), "keep_first_last": False})
    floats = input_report(model)["float_inputs"]
    assert floats["c1"] == "the model input"
    assert floats["mixed"] == "a concatenation of tensors on different grids"
    assert "same" not in floats and "fc1" not in floats  # one grid; a max pool and a flatten
    assert floats["gated"] == "a Sigmoid output (sig)"
    model = quantize_(_Joins(), {**quant(), "keep_first_last": False})
    assert input_report(model)["float_inputs"] == {}
    assert model.c1.input_quant.signed  # a normalized image can be negative
    assert not model.gated.input_quant.signed  # a sigmoid cannot
    assert not model.mixed.input_quant.signed  # two ReLU outputs, joined
    assert max(levels_read(warmed(model, (3, 8, 8)), torch.randn(2, 3, 8, 8)).values()) <= 16
