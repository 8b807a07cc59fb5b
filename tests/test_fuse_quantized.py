"""Exact BN fusion of quantized models (compress.fuse, exact=True): the fused model keeps every
quantized weight and rounds every activation as the unfused one did, so its logits are the
same within float rounding (here: bit for bit, mostly) and its top-1 predictions all agree."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.deploy.qdq import to_qdq
from compress.errors import CheckpointError
from compress.fuse import OutputScale, count_bn, fuse_bn_
from compress.models import create_model
from compress.pipeline import run_pipeline
from compress.quant import QConv2d, QLinear, quantize_
from compress.spec import checkpoint_state, model_from_checkpoint
from tests.test_engine import tiny_cfg
from tests.test_fuse import randomize_bn_

MODELS = {"resnet20": {"channels": [8] * 9}, "nin": {"channels": [16] * 8}}
DOREFA = {"kind": "dorefa", "bits": 4}
# (weight quantizer, activation quantizer): every weight kind, PACT activations, LSQ
CASES = {
    "dorefa2": ({"kind": "dorefa", "bits": 2}, {"kind": "dorefa", "bits": 2}),
    "dorefa4": (DOREFA, DOREFA),
    "dorefa8": ({"kind": "dorefa", "bits": 8}, {"kind": "dorefa", "bits": 8}),
    "ternary": ({"kind": "ternary"}, {"kind": "dorefa", "bits": 2}),
    "binary": ({"kind": "binary"}, {"kind": "binary"}),
    "int8": ({"kind": "int8"}, {"kind": "int8"}),
    "pact": (DOREFA, {"kind": "pact", "bits": 4}),
    "lsq": ({"kind": "lsq", "bits": 4}, {"kind": "lsq", "bits": 4}),
}
REL = 1e-4  # max |logit diff| relative to the largest logit


def quantized_model(name: str, weight: dict, act: dict, seed: int = 0) -> nn.Module:
    """A small zoo model, quantized, with random BN statistics and trained-looking ranges."""
    torch.manual_seed(seed)
    model = create_model(name, **MODELS[name])
    quantize_(model, {"weight": weight, "act": act})
    model.train()
    with torch.no_grad():  # one training batch: LSQ / int8 activations set their ranges
        model(torch.randn(8, 3, 32, 32))
        for n, p in model.named_parameters():
            if n.endswith("alpha"):  # a learned PACT clip, not the initial 6
                p.fill_(1.5)
    return randomize_bn_(model, seed)


def latent_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, QConv2d | QLinear) and m.weight_quant.kind != "fp32"
    }


def assert_same_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (got - ref).abs().max().item()
    assert diff <= REL * ref.abs().max().item(), diff
    assert torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_fusion_of_a_quantized_model(name, case, tmp_path):
    weight, act = CASES[case]
    model = quantized_model(name, weight, act)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    kept = latent_weights(model)
    fused = copy.deepcopy(model)
    plan = fuse_bn_(fused, exact=True)
    assert count_bn(fused) == 0 and not plan.skipped
    assert {f.mode for f in plan.folds} <= {"scale", "normal"}  # every activation rounds
    with torch.no_grad():
        out = fused(x)
    assert_same_logits(out, ref)
    # the quantized layers are still quantized, their latent weights untouched
    after = latent_weights(fused)
    assert after.keys() == kept.keys()
    assert all(torch.equal(after[k], kept[k]) for k in kept)
    # the checkpoint rebuilds the fused model with no code: identical logits
    save_checkpoint(tmp_path / "fused.pt", checkpoint_state(fused))
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "fused.pt")).eval()
    assert rebuilt.fused == fused.fused
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_the_default_fold_into_weights_is_not_exact_after_quantized_layers():
    """Why exact=True exists: the baked Q(w) * s (the default, what the QDQ export reads)
    changes the convs' float rounding, and the int8 activations round some values the other
    way."""
    model = quantized_model("resnet20", *CASES["int8"])
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    baked = copy.deepcopy(model)
    fuse_bn_(baked)
    with torch.no_grad():
        ref, out = model(x), baked(x)
    assert (out - ref).abs().max().item() > REL * ref.abs().max().item()


def test_output_scale_is_bit_for_bit_the_bn():
    torch.manual_seed(0)
    for bn, shape in ((nn.BatchNorm2d(12), (8, 12, 7, 5)), (nn.BatchNorm1d(12), (32, 12))):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.01, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
        bn.eval()
        scale = OutputScale.from_bn(bn)
        x = torch.randn(shape)
        inputs = [x, x.contiguous(memory_format=torch.channels_last)] if x.dim() == 4 else [x]
        with torch.no_grad():
            for v in inputs:
                assert torch.equal(scale(v), bn(v))
        assert set(scale.state_dict()) == {"scale", "bias"}  # unit statistics not stored


def test_int8_weights_fold_into_latent_weights_where_nothing_rounds():
    """Per-channel symmetric int8 is scale-equivariant, Q(s w) = s Q(w): with float
    activations the BN goes into the latent weight and the layer stays an int8 layer."""
    model = quantized_model("resnet20", {"kind": "int8"}, {"kind": "fp32"})
    x = torch.randn(16, 3, 32, 32)
    fused = copy.deepcopy(model)
    plan = fuse_bn_(fused, exact=True)
    modes = [f.mode for f in plan.folds]
    assert modes.count("latent") == 18 and modes.count("normal") == 1  # conv1 is kept float
    assert not any(isinstance(m, OutputScale) for m in fused.modules())
    assert sum(isinstance(m, QConv2d) for m in fused.modules()) == 18
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    rebuilt = model_from_checkpoint(checkpoint_state(fused)).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


@pytest.mark.parametrize("case", ["dorefa4", "binary"])
def test_an_exactly_fused_model_exports_as_the_unfused_one(case):
    """compress.deploy.qdq folds BNs into weight codes itself (the default fold); it folds the
    output scales of an exactly fused model the same way: the same integer model."""
    model = quantized_model("resnet20", *CASES[case])
    with torch.no_grad():
        for m in model.modules():  # a gamma of 0 has no int32 bias: not this test's subject
            if isinstance(m, nn.BatchNorm2d):
                m.weight[0] = 0.5
    fused = copy.deepcopy(model)
    fuse_bn_(fused, exact=True)
    q_model, r_model = to_qdq(model)
    q_fused, r_fused = to_qdq(fused)
    assert r_fused.integer_layers == r_model.integer_layers and r_fused.integer_layers
    assert r_fused.float_layers == r_model.float_layers
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(q_fused(x), q_model(x), rtol=1e-5, atol=1e-5)
    baked = copy.deepcopy(fused)
    fuse_bn_(baked)  # the default again: output scales into the weights, the record updated
    assert not any(isinstance(m, OutputScale) for m in baked.modules())
    assert {mode for _, _, mode in baked.fused} <= {"normal", "bias"}
    assert len(baked.fused) == len(fused.fused)


def test_an_unknown_fold_in_a_checkpoint_is_one_line():
    model = quantized_model("resnet20", *CASES["dorefa4"])
    fuse_bn_(model, exact=True)
    state = checkpoint_state(model)
    state["fused"][0][2] = "sideways"
    with pytest.raises(CheckpointError, match=r"mode 'sideways': expected one of normal, bias"):
        model_from_checkpoint(state)


def test_pipeline_fuse_stage_after_quantization_is_exact(tmp_path, caplog):
    cfg = tiny_cfg(epochs=1)
    cfg["model"] = {"name": "resnet20", "channels": [8] * 9}
    cfg["dataset"].update(num_train=64, num_test=128)
    quant = {"name": "w4a4", "weight": DOREFA, "act": DOREFA}
    cfg["schedule"]["stages"] = [
        "train",
        {"stage": "quantize", "quant": quant},
        {"stage": "fuse", "latency": False},
    ]
    logging.getLogger("compress.pipeline").disabled = False
    with caplog.at_level(logging.INFO, logger="compress.pipeline"):
        summary = run_pipeline(cfg, tmp_path)
    fuse = summary["stages"][-1]
    assert fuse["kind"] == "fuse" and fuse["images"] == 128
    assert fuse["top1_agreement"] == 100.0 and fuse["max_rel_diff"] <= REL
    assert fuse["max_abs_diff"] == 0.0  # bit for bit: every rounding as before
    assert fuse["fold_modes"]["scale"] == 19 and fuse["bn_after"] == 0
    assert "stage 02_fuse: max |logit diff| 0.00e+00 over 128 test images" in caplog.text
    metrics = json.loads((tmp_path / "02_fuse" / "metrics.json").read_text())
    assert metrics["top1_agreement"] == 100.0 and "max_abs_diff" in metrics
    # the fused checkpoint rebuilds to the quantize stage's model, logit for logit
    x = torch.randn(32, 3, 32, 32)
    quantized = model_from_checkpoint(load_checkpoint(tmp_path / "01_quantize" / "best.pt"))
    fused = model_from_checkpoint(load_checkpoint(tmp_path / "02_fuse" / "fused.pt"))
    with torch.no_grad():
        assert torch.equal(fused.eval()(x), quantized.eval()(x))


@pytest.mark.parametrize("exact", [False, True])
def test_a_bn_chain_folds_in_turns_and_a_bn_without_statistics_stays(exact):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
    )  # fmt: skip
    randomize_bn_(model[:3])
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x)
        plan = fuse_bn_(model, exact=exact)
        out = model(x)
    assert [(f.conv, f.bn) for f in plan.folds] == [("0", "1"), ("0", "2")]
    assert plan.skipped == {"5": "no running statistics (track_running_stats=False)"}
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight", [{"kind": "lsq", "bits": 4}, {"kind": "ternary"}, DOREFA])
def test_only_int8_weights_take_the_bn_into_their_latent_weight(weight):
    """LSQ's learned step is not scaled with its weight (Q(s w) != s Q(w)): with float
    activations its BN becomes an OutputScale, not a latent fold; so do the other kinds."""
    model = quantized_model("resnet20", weight, {"kind": "fp32"})
    x = torch.randn(16, 3, 32, 32)
    fused = copy.deepcopy(model)
    plan = fuse_bn_(fused, exact=True)
    assert "latent" not in {f.mode for f in plan.folds} and count_bn(fused) == 0
    with torch.no_grad():
        assert_same_logits(fused(x), model(x))
