"""The torchvision classifiers through the whole tool (bench/zoo.py's `check`): prune 40% by
filter L1 norms (BN or not) exactly or say in one line why nothing can be pruned, every
quantized layer's input at <= 16 levels (4-bit LSQ at layer inputs), BN folding exact, ONNX
Runtime equal to PyTorch.

CI (make test-slow) runs a sample of small models of every family the others are built from;
COMPRESS_ZOO=all runs all of torchvision.models.list_models() (about an hour on 2 cores, several
GiB for the largest), which is what bench/zoo.py's table in docs/zoo.md shows."""

from __future__ import annotations

import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from zoo import check, models  # noqa: E402

SAMPLE = [
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_y_400mf",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "googlenet",
    "resnet18",
    "convnext_tiny",
]
# what cannot be pruned, and the reason it must give (none of the sample: ConvNeXt's MLP
# hidden channels prune; its streams are frozen, normalized by LayerNorms and scaled by layer
# scales: the count names one of the two causes per stream)
REFUSED: dict[str, str] = {}
FROZEN_BECAUSE = {
    "convnext_tiny": (
        "normalized together (LayerNorm over the channels)",
        "scaled by a per-channel tensor (a layer scale) the graph does not resize",
    )
}
# relative to the largest logit: float rounding through tens of layers is ~1e-6; a wrongly
# thinned, folded or exported channel moves the logits by far more than 1e-4
TOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", models() if os.environ.get("COMPRESS_ZOO") == "all" else SAMPLE)
def test_a_torchvision_classifier_through_every_stage(name):
    row = check(name)
    if name in REFUSED:
        assert "has no prunable channels: all" in row["prune_error"], row
        assert REFUSED[name] in row["prune_error"], row
    else:
        assert "prune_error" not in row, row["prune_error"]
        if name in FROZEN_BECAUSE:
            assert row["frozen_top"] in FROZEN_BECAUSE[name], row
        assert row["prune_rel_diff"] <= TOL and row["params_pruned"] < row["params"], row
    assert "quant_error" not in row, row.get("quant_error")
    assert row["quant_float_inputs"] == 0 and row["quant_max_levels"] <= 16, row
    assert "fuse_error" not in row and row["fuse_rel_diff"] <= TOL, row
    assert "onnx_error" not in row and row["onnx_rel_diff"] <= TOL, row
