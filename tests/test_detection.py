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


def test_the_task_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)  # a fresh detector: the shared one may have been trained already
    ssdlite = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)
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
    ssdlite.train()
    metrics = DetectionTask().evaluate(ssdlite, [_batch(2, seed=1)])
    assert {"map", "map50"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("map", "map50"))
    assert ssdlite.training  # left as it was found


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


def test_cifar10_det_builds_once_and_reads_as_coco(cifar_root, tmp_path):
    from compress.detection.data import load_detection_data, loaders

    cfg = {"name": "cifar10_det", "root": str(cifar_root), "build_dir": str(tmp_path / "det")}
    cfg |= {"num_train": 8, "num_val": 4, "image_size": 64}
    data = load_detection_data(cfg)
    assert (len(data.train), len(data.test)) == (8, 4)
    assert data.num_classes == 11 and data.classes[0] == "airplane"
    stamp = (tmp_path / "det" / "cifar10_det.json").stat().st_mtime_ns
    assert load_detection_data(cfg).num_classes == 11  # the cached build, not a new one
    assert (tmp_path / "det" / "cifar10_det.json").stat().st_mtime_ns == stamp
    train, test = loaders(data, batch_size=4)
    images, targets = next(iter(test))
    assert [tuple(x.shape) for x in images] == [(3, 64, 64)] * 4
    assert all(t["boxes"].shape[1] == 4 and len(t["boxes"]) == len(t["labels"]) for t in targets)
    assert all(((t["labels"] >= 1) & (t["labels"] <= 10)).all() for t in targets)


@pytest.mark.parametrize(
    ("model", "dataset", "message"),
    [
        (
            {"name": "resnet20"},
            "cifar10_det",
            "model=resnet20 is a classifier and dataset=cifar10_det",
        ),
        (
            {"source": "torchvision_det", "name": "ssdlite320_mobilenet_v3_large"},
            "cifar10",
            "model.name=ssdlite320_mobilenet_v3_large is a detector and dataset=cifar10 a "
            "classification data set",
        ),
    ],
)
def test_a_model_of_the_other_task_is_one_line(model, dataset, message):
    from compress.detection.data import check_model_fits_data

    with pytest.raises(ConfigError, match=message):
        check_model_fits_data(model, dataset)
    check_model_fits_data(model, "coco" if model.get("source") else "cifar10")  # the fit: quiet


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"name": "cifar10"}, "dataset=cifar10 is not a detection data set"),
        ({"name": "coco", "image_size": 8}, "dataset.image_size=8 is invalid"),
    ],
)
def test_bad_detection_data_settings_are_one_line(cfg, message):
    from compress.detection.data import load_detection_data

    with pytest.raises(ConfigError, match=message):
        load_detection_data(cfg)


@pytest.mark.slow  # about 8 s on 2 cores (make test-slow)
def test_the_core_keeps_the_detectors_mode_and_prunes_exactly():
    """The backbone and the heads' input channels thin together; the head outputs (anchor
    boxes and class scores per location) stay whole; the thinned core equals the original
    with the removed channels' input columns zeroed."""
    import sys

    from compress.prune import channel_graph, l1_importance, select_channels, thin
    from tests.conftest import ROOT

    sys.path.insert(0, str(ROOT / "bench"))
    from zoo import columns_zeroed, randomize_norms_

    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", num_classes=4, image_size=SIZE)
    randomize_norms_(model)
    core = DetectionTask().core(model.eval())
    assert not core.training
    shape = (3, SIZE, SIZE)
    graph = channel_graph(core, shape, require_bn=False)
    assert not any(m.training for m in model.modules())  # tracing left the detector in eval
    _, _, why = graph.frozen_channels()
    assert set(why) == {"read by an op the channel graph does not follow (getattr)"}  # heads'
    keep = select_channels(graph, percent=0.3, importance=l1_importance, scope="layer")
    small = thin(core, keep, shape, require_bn=False).eval()
    params = [sum(p.numel() for p in m.parameters()) for m in (core, small)]
    assert params[1] < 0.7 * params[0]
    x = torch.randn(2, *shape)
    with torch.no_grad():
        got, want = small(x), columns_zeroed(core, graph, keep)(x)
    for k in ("bbox_regression", "cls_logits"):
        assert got[k].shape == want[k].shape
        assert (got[k] - want[k]).abs().max() <= 1e-4 * want[k].abs().max(), k
