"""quantize_ on models this project did not write: torchvision's and a user's own."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from compress.errors import ConfigError
from compress.models import create_model
from compress.quant import QConv2d, QLinear, applied_label, bit_widths, quantize_, to_float
from compress.quant.api import WEIGHT_HANDLERS, execution_order, register_weight_handler
from compress.quant.quantizers import BinaryAct, DoReFaAct, PACTAct
from compress.spec import checkpoint_state, model_from_checkpoint
from tests.custom_models import small_cnn

W4A4 = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}}


def relu_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every activation quantizer / ReLU, captured with forward hooks."""
    outs: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))
        for m in model.modules()
        if isinstance(m, DoReFaAct | PACTAct | BinaryAct | nn.ReLU)
    ]
    model.eval()(x)
    for h in hooks:
        h.remove()
    return outs


def test_torchvision_resnet18_activations_are_really_quantized():
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    before = relu_outputs(model, x)
    assert max(o.unique().numel() for o in before) > 1000  # float: thousands of levels
    quantize_(model, W4A4)
    after = relu_outputs(model, x)
    assert after and all(o.unique().numel() <= 16 for o in after)  # 4 bits: at most 16 levels
    assert bit_widths(model) == (4, 4) and applied_label(model) == "w4a4"
    # first and last layers in execution order stay float, every other conv is quantized
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer4[1].conv2, QConv2d)
    assert sum(isinstance(m, QConv2d) for m in model.modules()) == 19


def test_custom_model_round_trips_through_its_checkpoint():
    model = create_model(source="custom", target="tests.custom_models.small_cnn", width=8)
    quantize_(model, {**W4A4, "act": {"kind": "pact", "bits": 4}})
    assert sum(isinstance(m, PACTAct) for m in model.modules()) == 4
    again = model_from_checkpoint(checkpoint_state(model))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), model.eval()(x))


def test_binary_activations_emit_signs_on_a_custom_model():
    model = small_cnn()
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    outs = relu_outputs(model, torch.randn(2, 3, 32, 32))
    assert all(set(o.unique().tolist()) <= {-1.0, 1.0} for o in outs)
    assert applied_label(model) == "wbab"


class HeadFirst(nn.Module):
    """Registers its classifier before its stem: registration order is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 10)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.body(self.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_first_and_last_layers_follow_execution_order():
    model = HeadFirst()
    assert execution_order(model, ["head", "body", "stem"]) == ["stem", "body", "head"]
    quantize_(model, W4A4)
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert isinstance(model.body, QConv2d)


class TwoHeads(nn.Module):
    """A body and two heads, one of them a conv and a linear after it, as a detector's core
    returns its class scores and box offsets: the layers whose outputs are the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.scores = nn.Conv2d(8, 4, 1)
        self.box_hidden, self.boxes = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.relu(self.body(torch.relu(self.stem(x))))
        z = self.box_hidden(y).mean((2, 3)).relu()
        return {"scores": self.scores(y).flatten(1), "boxes": self.boxes(z) * 2}


def test_every_layer_that_makes_an_output_stays_float_with_keep_first_last():
    model = quantize_(TwoHeads(), {**W4A4, "act": {"kind": "fp32"}})
    floats = sorted(n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear))
    assert floats == ["boxes", "scores", "stem"]  # box_hidden feeds another layer: quantized
    assert isinstance(model.box_hidden, QConv2d) and isinstance(model.body, QConv2d)


class MyConv(nn.Conv2d):
    """A Conv2d subclass with a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_conv_subclasses_are_left_alone_unless_registered():
    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), MyConv(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten()
        )

    model = quantize_(net(), {**W4A4, "keep_first_last": False})
    assert type(model[1]) is MyConv  # its forward (the x2) is kept
    assert isinstance(model[0], QConv2d) and isinstance(model[3], QConv2d)
    register_weight_handler(MyConv, QConv2d.from_float)  # the user's choice: plain QConv2d
    try:
        model = quantize_(net(), {**W4A4, "keep_first_last": False})
        assert isinstance(model[1], QConv2d)
    finally:
        WEIGHT_HANDLERS.pop(MyConv)


def test_filter_fn_selects_layers():
    model = create_model("resnet20")
    quantize_(model, W4A4, filter_fn=lambda m, name: name.startswith("layers.0."))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QConv2d | QLinear)]
    assert quantized == ["layers.0.conv1", "layers.0.conv2"]


def test_no_activation_to_quantize_is_refused():
    class FunctionalRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(x.mean((2, 3)))

    with pytest.raises(ConfigError, match="has no activation to quantize"):
        quantize_(FunctionalRelu(), W4A4)
    # weights alone are fine
    model = quantize_(FunctionalRelu(), {"weight": W4A4["weight"], "act": {"kind": "fp32"}})
    assert applied_label(model) == "w4a32" and bit_widths(model) == (4, 32)


def test_weights_asked_for_but_every_layer_kept_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    with pytest.raises(ConfigError, match="no layer of Sequential was quantized"):
        quantize_(net, W4A4)


def test_to_float_restores_a_torchvision_model():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    ref = model(x)
    quantize_(model, {"weight": W4A4["weight"], "act": {"kind": "pact", "bits": 4, "clip_init": 6}})
    assert not torch.allclose(model(x), ref)
    to_float(model)
    assert not any(isinstance(m, QConv2d | PACTAct) for m in model.modules())
    assert torch.equal(model(x), ref)  # ReLU6 put back where it was
