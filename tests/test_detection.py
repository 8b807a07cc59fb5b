"""torchvision detectors at CPU size (compress.detection.models) and the detection task object
(compress.detection.task): a step of training lowers the loss on a fixed batch, evaluation is
COCO mAP, and the core (backbone, neck, heads) is one traceable module."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from compress.detection.models import build_detector
from compress.detection.task import DetectionTask, DetectorCore
from compress.errors import ConfigError

SIZE = 96


def _batch(n: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[dict]]:
    """Noise images, each with one bright square of a class-coloured channel and its box."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(n):
        x = torch.rand(3, SIZE, SIZE, generator=g) * 0.2
        x0, y0 = 10 + 20 * i, 16
        x[i % 3, y0 : y0 + 40, x0 : x0 + 40] = 1.0
        images.append(x)
        box = torch.tensor([[x0, y0, x0 + 40, y0 + 40]], dtype=torch.float32)
        targets.append({"boxes": box, "labels": torch.tensor([1 + i % 3])})
    return images, targets


@pytest.fixture(scope="module")
def ssdlite():
    torch.manual_seed(0)
    return build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)


def test_a_detector_reads_images_at_the_configured_size(ssdlite):
    assert ssdlite.transform.fixed_size == (SIZE, SIZE)
    assert ssdlite.detections_per_img == 100  # what COCO mAP counts (torchvision's SSD: 300)
    ssdlite.eval()
    with torch.no_grad():
        out = ssdlite([torch.rand(3, 64, 80), torch.rand(3, SIZE, SIZE)])
    assert [set(o) for o in out] == [{"boxes", "scores", "labels"}] * 2
    # boxes come back in each input image's own pixels
    assert out[0]["boxes"][:, 2].max() <= 80 + 1e-3 and out[0]["boxes"][:, 3].max() <= 64 + 1e-3


@pytest.mark.parametrize(
    ("name", "size", "message"),
    [
        ("resnet18", SIZE, "model.name=resnet18 is not a torchvision detector: expected one of"),
        ("ssdlite320_mobilenet_v3_large", 16, "model.image_size=16 is invalid"),
    ],
)
def test_bad_detector_settings_are_one_line(name, size, message):
    with pytest.raises(ConfigError, match=message):
        build_detector(name, num_classes=4, image_size=size)


def test_the_task_loss_falls_on_a_fixed_batch(ssdlite):
    task = DetectionTask()
    batch = _batch()
    model = ssdlite.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for _ in range(8):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


def test_evaluation_is_coco_map_in_percent(ssdlite):
    metrics = DetectionTask().evaluate(ssdlite, [_batch(2, seed=1)])
    assert {"map", "map50"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("map", "map50"))
    assert ssdlite.training  # left as it was found (training, from the test before)


@pytest.mark.parametrize(
    ("name", "outputs"),
    [
        ("ssdlite320_mobilenet_v3_large", {"bbox_regression", "cls_logits"}),
        ("fasterrcnn_mobilenet_v3_large_fpn", None),  # the RPN head: (objectness, deltas)
    ],
)
def test_the_core_is_one_traceable_module_sharing_the_detectors_layers(name, outputs):
    torch.manual_seed(0)
    model = build_detector(name, num_classes=4, image_size=SIZE).eval()
    core = DetectionTask().core(model)
    assert isinstance(core, DetectorCore) and core.backbone is model.backbone
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = core(x)
        traced = fx.symbolic_trace(core)
        again = traced(x)
    if outputs is not None:
        assert set(out) == outputs and all(torch.equal(out[k], again[k]) for k in outputs)
    else:
        objectness, deltas = out
        assert len(objectness) == len(deltas) == len(model.backbone(x))
        assert all(torch.equal(a, b) for a, b in zip(objectness, again[0], strict=True))
