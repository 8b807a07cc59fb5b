"""COCO mAP of detections: torchmetrics' MeanAveragePrecision (pycocotools underneath), the
maintained implementation, not a hand-written one. metrics.json gets `map` (mAP@[.5:.95]),
`map50`, `map75` and the per-size `map_small` / `map_medium` / `map_large`, in percent.
"""

from __future__ import annotations

from typing import Any

import torch

KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
NAMES = {"map_50": "map50", "map_75": "map75"}  # metrics.json names


class DetectionMAP:
    """Accumulate batches of (predictions, targets) in torchvision's detection format
    (XYXY `boxes`, `labels`, and the predictions' `scores`); `compute` gives the percents."""

    def __init__(self) -> None:
        try:
            import pycocotools  # noqa: F401  (the backend torchmetrics runs)
            from torchmetrics.detection import MeanAveragePrecision
        except ImportError as e:
            raise ImportError(
                f"COCO mAP needs torchmetrics and pycocotools ({e.name} is missing): "
                "pip install -e '.[detection]'"
            ) from None

        self.metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", backend="pycocotools"
        )

    def update(self, preds: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]]) -> None:
        self.metric.update(
            [  # float32: a bf16 autocast's boxes and scores too
                {
                    "boxes": p["boxes"].detach().cpu().float(),
                    "scores": p["scores"].detach().cpu().float(),
                    "labels": p["labels"].detach().cpu(),
                }
                for p in preds
            ],
            [
                {"boxes": torch.as_tensor(t["boxes"]).cpu(), "labels": t["labels"].cpu()}
                for t in targets
            ],
        )

    def compute(self) -> dict[str, float]:
        out = self.metric.compute()
        # -1: no object of that size in the targets (COCO's convention), kept as is
        return {NAMES.get(k, k): float(out[k]) * (100 if float(out[k]) >= 0 else 1) for k in KEYS}
