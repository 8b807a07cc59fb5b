from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import ConfigError
from compress.metrics import count_params
from compress.models import create_model, list_models
from compress.models.blocks import Activation, ChannelShuffle


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_shape(name):
    model = create_model(name, num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.arch["name"] == name and model.arch["num_classes"] == 7


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_grayscale_28px(name):
    model = create_model(name, in_channels=1)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", list_models())
def test_every_model_has_quantizable_activation_slots(name):
    assert any(isinstance(m, Activation) for m in create_model(name).modules())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # conv weights 965,568 + BN 2,836 (hand count: the seed README's 0.67M is off)
        ("nin", 968_404),
        # group convs: 578,304 conv weights + 8,724 BN
        ("nin_gc", 587_028),
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet56", 853_018),
    ],
)
def test_parameter_counts(name, params):
    assert count_params(create_model(name)) == params


def test_nin_gc_groups_and_shuffles():
    model = create_model("nin_gc")
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 2, 16, 4, 4, 32, 8]
    shuffles = [m.groups for m in model.features.modules() if isinstance(m, ChannelShuffle)]
    assert shuffles == [2, 2, 16, 4, 4, 32]  # before every group conv after the second


def test_channel_shuffle_permutes_channels():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


def test_channel_spec_rebuilds_a_smaller_model():
    spec = [96, 80, 48, 96, 96, 96, 96, 96]
    model = create_model("nin", channels=spec)
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == spec
    rebuilt = create_model(**model.arch)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    assert torch.equal(model(x), rebuilt(x))


def test_resnet_channel_spec_sets_inner_block_widths():
    model = create_model("resnet20", channels=[8] * 9)
    assert all(b.conv1.out_channels == 8 for b in model.layers)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bacp_order_puts_bn_before_conv():
    model = create_model("nin", order="bacp")
    block = model.features[1]
    assert block.order == "bacp" and block.bn.num_features == block.conv.in_channels
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "nope"}, "model='nope' is unknown: expected one of"),
        ({"name": "nin", "channels": [10, 10]}, "model.channels"),
        (
            {"name": "nin_gc", "channels": [256, 255, 256, 512, 512, 512, 1024, 1024]},
            "divisible by its 2 groups",
        ),
        ({"name": "nin", "order": "abcd"}, "model.order='abcd' is invalid"),
        ({"name": "nin", "depth": 3}, "model=nin"),
    ],
)
def test_bad_model_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        create_model(**kwargs)
