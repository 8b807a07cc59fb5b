"""compress/spec.py on its own: names and overrides of a model's arch, the rebuild's refusals,
and the strict state_dict load with its one exception (a new classifier head). The flows that
use them (import, prune, fuse from a state_dict) are in test_import.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import CheckpointError
from compress.models import create_model
from compress.spec import (
    _fits,
    _listed,
    arch_name,
    checkpoint_state,
    load_error_line,
    load_state_dict_,
    matching_zoo_model,
    model_from_checkpoint,
    model_overrides,
    model_spec,
)

TV = {"source": "torchvision", "name": "resnet18"}
CUSTOM = {"source": "custom", "target": "pkg.mod.build"}


def test_arch_names_and_overrides_per_source():
    assert arch_name({"name": "nin"}) == "nin"
    assert arch_name(TV) == "torchvision/resnet18"
    assert arch_name(CUSTOM) == "custom/pkg.mod.build"
    assert model_overrides({"name": "nin"}) == "model=nin"
    assert model_overrides(TV) == "model=torchvision model.name=resnet18"
    assert model_overrides(CUSTOM) == "model=custom model.target=pkg.mod.build"


def test_listed_names_three_keys_and_counts_the_rest():
    assert _listed(["a", "b"]) == "a, b"
    assert _listed(["a", "b", "c"]) == "a, b, c"
    assert _listed(["a", "b", "c", "d"]) == "a, b, c (4 in all)"
    assert _listed(["a", "b"], n=1) == "a (2 in all)"


def test_fits_needs_the_same_keys_and_the_same_shapes():
    model = nn.Linear(3, 2)
    sd = model.state_dict()
    assert _fits(model, sd)
    assert not _fits(model, {**sd, "extra": torch.zeros(1)})  # a superset does not fit
    assert not _fits(model, {"weight": sd["weight"]})  # nor a subset
    for shape in ((2, 4), (2, 2), (1, 3), (3, 3)):  # larger and smaller in either dim
        assert not _fits(model, {**sd, "weight": torch.zeros(shape)}), shape


def test_the_zoo_model_that_fits_a_state_dict_is_found():
    sd = create_model("resnet20", num_classes=10).state_dict()
    assert matching_zoo_model(sd, 10, 3) == "resnet20"
    assert matching_zoo_model(sd, 100, 3) is None  # the head has 10 classes, not 100
    assert matching_zoo_model({"w": torch.zeros(1)}, 10, 3) is None


def test_the_zoo_search_skips_builders_that_fail(monkeypatch):
    import compress.spec as spec

    real = spec.create_model

    def picky(name, **kw):
        if name != "resnet20":
            raise TypeError(f"{name} needs other arguments")
        return real(name, **kw)

    monkeypatch.setattr(spec, "create_model", picky)
    sd = real("resnet20", num_classes=10).state_dict()
    assert matching_zoo_model(sd, 10, 3) == "resnet20"


class ConvHead(nn.Module):
    """A fully convolutional classifier: its head is a 1x1 conv."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


def test_a_conv_head_with_another_class_count_starts_fresh():
    model, other = ConvHead(10), ConvHead(5)
    fresh = model.head.weight.detach().clone()
    info = load_state_dict_(model, other.state_dict(), "f.pt")
    assert info == {"head": "head", "from_classes": 5, "to_classes": 10}
    assert torch.equal(model.body.weight, other.body.weight)
    assert torch.equal(model.head.weight, fresh)


def test_a_misfit_that_is_not_a_head_is_refused_with_its_keys():
    model = ConvHead(10)
    sd = ConvHead(10).state_dict()
    sd["body.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_(model, sd, "f.pt")
    assert str(e.value) == (
        "f.pt: the state_dict does not fit ConvHead: "
        "mis-shaped body.weight (file 4x3x5x5, model 4x3x3x3)"
    )
    sd = {k: v for k, v in ConvHead(10).state_dict().items() if k != "head.bias"}
    sd.update(
        {"x1": torch.zeros(()), "x2": torch.zeros(1), "x3": torch.zeros(1), "x4": torch.zeros(1)}
    )
    with pytest.raises(CheckpointError) as e:
        load_state_dict_(model, sd, "f.pt")
    assert str(e.value) == (
        "f.pt: the state_dict does not fit ConvHead: missing keys head.bias; "
        "unexpected keys x1, x2, x3 (4 in all)"
    )


def test_a_head_change_is_refused_when_new_head_is_off():
    with pytest.raises(
        CheckpointError,
        match=r"mis-shaped head.weight \(file 5x4x1x1, model 10x4x1x1\) and 1 more$",
    ):
        load_state_dict_(ConvHead(10), ConvHead(5).state_dict(), "f.pt", new_head=False)


def test_a_head_whose_input_width_differs_is_no_head_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 10))
    sd = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)).state_dict()  # other in_features too
    with pytest.raises(CheckpointError, match="mis-shaped 1.weight"):
        load_state_dict_(model, sd, "f.pt")


def test_a_rebuilt_checkpoint_of_another_model_is_refused_by_name():
    state = checkpoint_state(create_model("resnet20", channels=[4] * 9))
    with pytest.raises(
        CheckpointError, match="holds a 'resnet20' model but model=nin; pass model=resnet20"
    ):
        model_from_checkpoint(state, expect="nin")
    assert isinstance(model_from_checkpoint(state, expect="resnet20"), nn.Module)


def test_weights_that_do_not_fit_the_rebuilt_model_name_the_first_key():
    state = checkpoint_state(create_model("resnet20", channels=[4] * 9))
    state["model"] = dict(state["model"])
    state["model"]["fc.weight"] = torch.zeros(3, 3)
    del state["model"]["fc.bias"]
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(state)
    # the first line of torch's message that names keys (its own first names the class)
    assert str(e.value) == (
        "checkpoint weights do not fit its resnet20 architecture: "
        'Missing key(s) in state_dict: "fc.bias".'
    )


def test_load_error_line_skips_torchs_header():
    e = RuntimeError("Error(s) in loading state_dict for X:\n\tMissing key(s): a.\n\tsize b")
    assert load_error_line(e) == "Missing key(s): a."
    assert load_error_line(RuntimeError("one line")) == "one line"
    assert load_error_line(RuntimeError("")) == "RuntimeError"


def test_a_model_not_built_by_the_zoo_has_no_spec():
    with pytest.raises(
        CheckpointError, match="Linear was not built by compress.models.create_model"
    ):
        model_spec(nn.Linear(2, 2))


def test_a_quantized_checkpoint_rebuilds_quantized_or_float_as_asked():
    from compress.fuse import fuse_bn_
    from compress.quant import QConv2d, quantize_
    from compress.quant.quantizers import DoReFaAct

    model = quantize_(
        create_model("resnet20", channels=[4] * 9),
        {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "dorefa", "bits": 4}},
    )
    state = checkpoint_state(model)
    assert any(isinstance(m, QConv2d) for m in model_from_checkpoint(state).modules())
    plain = model_from_checkpoint(state, quantized=False)
    assert not any(isinstance(m, QConv2d | DoReFaAct) for m in plain.modules())
    fuse_bn_(model.eval())  # a fused checkpoint is rebuilt as it was fused, whatever is asked
    fused = model_from_checkpoint(checkpoint_state(model), quantized=False)
    assert fused.fused and any(isinstance(m, DoReFaAct) for m in fused.modules())


def test_a_head_reading_fewer_features_is_no_head_change_either():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 10))
    sd = {**model.state_dict(), "1.weight": torch.zeros(2, 3), "1.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"mis-shaped 1.weight \(file 2x3, model 10x4\)"):
        load_state_dict_(model, sd, "f.pt")
