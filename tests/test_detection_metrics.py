"""COCO mAP (compress/detection/metrics.py) against pycocotools' own COCOeval on a hand-made
set of predictions: boxes hit, half-hit and missed, a wrong class, a false positive, and
objects of every COCO size."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from compress.detection.metrics import DetectionMAP  # noqa: E402

TARGETS = [  # XYXY; sizes: small < 32^2 px, medium < 96^2, large
    {
        "boxes": torch.tensor([[10.0, 10, 30, 30], [50, 50, 150, 150]]),
        "labels": torch.tensor([1, 2]),
    },
    {
        "boxes": torch.tensor([[0.0, 0, 60, 60], [100, 20, 300, 220]]),
        "labels": torch.tensor([1, 1]),
    },
    {"boxes": torch.tensor([[5.0, 5, 20, 25]]), "labels": torch.tensor([3])},
]
PREDS = [
    {  # an exact hit, a shifted hit, a false positive
        "boxes": torch.tensor([[10.0, 10, 30, 30], [60, 55, 160, 150], [200, 200, 220, 230]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 2]),
    },
    {  # a half hit, a wrong class on the large object
        "boxes": torch.tensor([[0.0, 0, 60, 40], [100, 20, 300, 220]]),
        "scores": torch.tensor([0.6, 0.95]),
        "labels": torch.tensor([1, 3]),
    },
    {
        "boxes": torch.zeros(0, 4),
        "scores": torch.zeros(0),
        "labels": torch.zeros(0, dtype=torch.long),
    },
]


def pycocotools_stats() -> list[float]:
    """COCOeval on the same set, from its own JSON-style dicts (XYWH boxes)."""

    def xywh(b):
        x1, y1, x2, y2 = b.tolist()
        return [x1, y1, x2 - x1, y2 - y1]

    images = [{"id": i + 1, "width": 320, "height": 240} for i in range(len(TARGETS))]
    anns, dets = [], []
    for i, (t, p) in enumerate(zip(TARGETS, PREDS, strict=True)):
        for b, c in zip(t["boxes"], t["labels"], strict=True):
            w, h = xywh(b)[2:]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(c),
                    "bbox": xywh(b),
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, c in zip(p["boxes"], p["scores"], p["labels"], strict=True):
            dets.append(
                {"image_id": i + 1, "category_id": int(c), "bbox": xywh(b), "score": float(s)}
            )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k} for k in (1, 2, 3)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [100 * float(v) if v >= 0 else float(v) for v in ev.stats[:6]]


def test_map_equals_pycocotools_on_a_hand_made_set():
    metric = DetectionMAP()
    metric.update(PREDS[:2], TARGETS[:2])  # in two batches, as an evaluation loop does
    metric.update(PREDS[2:], TARGETS[2:])
    got = metric.compute()
    want = dict(
        zip(
            ("map", "map50", "map75", "map_small", "map_medium", "map_large"),
            pycocotools_stats(),
            strict=True,
        )
    )
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-4), k
    assert 0 < got["map"] < got["map50"] < 100  # misses and a false positive cost something


def test_perfect_detections_score_100():
    metric = DetectionMAP()
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in TARGETS]
    metric.update(perfect, TARGETS)
    got = metric.compute()
    assert got["map"] == pytest.approx(100.0) and got["map50"] == pytest.approx(100.0)
