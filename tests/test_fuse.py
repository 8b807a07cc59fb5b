from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from compress.fuse import apply_fused_structure_, count_bn, fuse_bn_, plan_fusion
from compress.models import create_model, list_models
from compress.models.blocks import Activation, ConvBlock
from compress.quant import QConv2d, quantize_


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms, with some negative and some zero gammas."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.weight.data[0] = 0.0
            m.weight.data[1] = -abs(m.weight.data[1]) - 0.1
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("name", list_models())
def test_normal_fusion_is_exact_for_every_model(name):
    torch.manual_seed(0)
    model = randomize_bn_(create_model(name))
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    plan = fuse_bn_(model)
    assert not plan.skipped and count_bn(model) == 0
    out = model(x)
    scale = max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= 1e-5 * scale


def test_fusion_of_a_pruned_model():
    model = randomize_bn_(create_model("nin", channels=[40, 32, 24, 48, 40, 32, 48, 40]))
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    fuse_bn_(model)
    assert count_bn(model) == 0 and torch.allclose(model(x), ref, atol=1e-5)


def test_train_mode_is_switched_to_eval_with_a_notice(caplog):
    model = create_model("resnet20").train()
    logging.getLogger("compress.fuse").disabled = False  # a runtime's import may disable it
    with caplog.at_level(logging.WARNING, logger="compress.fuse"):
        fuse_bn_(model)
    assert not model.training and "switched to eval mode" in caplog.text


def signs_of(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: seen.append(o.clone()))
        for m in model.modules()
        if isinstance(m, Activation)
    ]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("weights", ["binary", "ternary", "fp32"])
def test_binary_activation_fusion_keeps_every_sign(weights):
    torch.manual_seed(1)
    model = create_model("nin")
    quantize_(model, {"weight": {"kind": weights}, "act": {"kind": "binary"}})
    randomize_bn_(model)
    x = torch.randn(4, 3, 32, 32)
    ref_signs, ref = signs_of(model, x), model(x)
    plan = fuse_bn_(model)
    assert {f.mode for f in plan.folds} == {"bias", "normal"}  # classifier BN feeds a ReLU
    assert count_bn(model) == 0
    for a, b in zip(ref_signs, signs_of(model, x), strict=True):
        assert torch.equal(a, b)
    assert torch.allclose(model(x), ref, atol=1e-4)
    for m in model.modules():  # bias-folded layers keep quantized weights
        if isinstance(m, QConv2d) and weights != "fp32":
            per_channel = m.quantized_weight().flatten(1)
            assert all(row.unique().numel() <= 3 for row in per_channel)


def test_binary_fusion_near_the_threshold():
    torch.manual_seed(2)
    block = ConvBlock(8, 6, 3)
    quantize_(
        block, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}, "keep_first_last": False}
    )
    block.eval()
    x = torch.randn(2, 8, 6, 6)
    y = block.conv(x)
    bn = block.bn
    with torch.no_grad():
        # Put each channel's threshold just beside one of its actual conv outputs.
        eps = torch.tensor([1e-4, -1e-4, 2e-4, -2e-4, 1e-4, -1e-4])
        bn.running_mean.copy_(y[0, :, 2, 3] + eps)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -2.0, 0.0, 1.5]))
        bn.bias.zero_()
    ref = block(x)
    near = (bn(y)).abs() < 1e-3
    assert near.sum() >= 4  # the test really probes the threshold
    fuse_bn_(block)
    assert torch.equal(block(x), ref)
    assert torch.equal(block(x)[:, 4], torch.ones_like(ref[:, 4]))  # gamma = 0, beta = 0: +1


def test_bn_after_max_pool_with_negative_gamma_is_kept_and_reported(caplog):
    model = create_model("nin", order="bacp")
    quantize_(model, {"weight": {"kind": "binary"}, "act": {"kind": "binary"}})
    randomize_bn_(model)
    x = torch.randn(2, 3, 32, 32)
    ref = signs_of(model, x)
    plan = fuse_bn_(model)
    assert "features.4.bn" in plan.skipped and "max pool" in plan.skipped["features.4.bn"]
    assert "fuse: kept features.4.bn" in caplog.text
    for a, b in zip(ref, signs_of(model, x), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act", ["dorefa", "pact", "binary"])  # binary: "bias" folds, float and
def test_fused_structure_rebuilds_for_loading(act):  # ternary layers before a sign
    torch.manual_seed(0)
    model = randomize_bn_(create_model("resnet20"))
    quantize_(model, {"weight": {"kind": "ternary"}, "act": {"kind": act, "bits": 4}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("alpha"):  # a learned PACT clip must survive fusion and loading
                p.fill_(1.5)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    fuse_bn_(model)
    assert torch.allclose(model(x), before, atol=1e-4)
    fresh = create_model("resnet20")
    quantize_(fresh, model.quant_config)
    apply_fused_structure_(fresh, model.fused)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.eval()(x), model(x))


def test_plan_reports_a_bn_without_conv():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1)).eval()
    assert "0" in plan_fusion(model).skipped


class _SharedPool(nn.Module):
    """conv -> max pool, the pooled tensor read by a BN and by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool(self.conv(x))
        return self.head((torch.relu(self.bn(p)) + p).mean((2, 3)))


class _DeadBranch(nn.Module):
    """A conv -> BN whose output nothing reads (a node without users in the trace)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.side, self.side_bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side_bn(self.side(x))  # computed, never used
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_bn_behind_a_pool_that_another_layer_also_reads_stays():
    """Folding it into the conv would change what the residual add reads."""
    model = randomize_bn_(_SharedPool()).eval()
    with torch.no_grad():  # positive scales: a max pool alone would not stop the fold
        model.bn.weight.abs_().add_(0.1)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    plan = fuse_bn_(model)
    assert not plan.folds and count_bn(model) == 1 and "bn" in plan.skipped
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_a_bn_nothing_reads_does_not_stop_the_fusion():
    model = randomize_bn_(_DeadBranch()).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    plan = fuse_bn_(model)
    assert {(f.conv, f.bn) for f in plan.folds} >= {("conv", "bn")}
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)
