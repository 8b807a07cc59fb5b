"""What a detector's training and evaluation need from the engine, in one object: its loss
(torchvision detectors compute their own losses in training mode), its metric (COCO mAP) and
the part of the model that quantization, pruning, fusion and export see (`core`: backbone,
neck and heads as one traceable module; the input transform, anchors, box decoding and NMS
stay float and outside)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress.detection.metrics import DetectionMAP

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


class DetectionTask:
    name = "detection"
    metric = "map"  # what "best" means: COCO mAP@[.5:.95]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of the detector's own losses (classification and box regression)."""
        images, targets = batch
        losses = model(images, [_plain(t) for t in targets])
        return sum(losses.values())  # type: ignore[return-value]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
        """COCO mAP@[.5:.95] (`map`), mAP@.5 (`map50`) and per-size AP, in percent."""
        was = model.training
        model.eval()
        metric = DetectionMAP()
        for images, targets in loader:
            metric.update(model(images), [_plain(t) for t in targets])
        model.train(was)
        return metric.compute()

    def core(self, model: nn.Module) -> nn.Module:
        """The traceable compute of `model`: images (a normalized, resized batch tensor) in,
        the heads' raw outputs out."""
        return DetectorCore(model)


class DetectorCore(nn.Module):
    """backbone (+ FPN) -> head of a one-stage torchvision detector (SSD, RetinaNet, FCOS),
    or backbone (+ FPN) -> RPN head of a two-stage one; shares the detector's modules."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone = detector.backbone
        head = getattr(detector, "head", None)
        self.two_stage = head is None
        self.head = detector.rpn.head if self.two_stage else head
        self.training = detector.training  # its own flag, else .train() would flip the layers

    def forward(self, x: torch.Tensor) -> Any:
        features = self.backbone(x)
        maps = list(features.values()) if isinstance(features, dict) else [features]
        return self.head(maps)


def _plain(target: dict[str, Any]) -> dict[str, Any]:
    """A target as torchvision's detectors take it: plain tensors, not tv_tensors."""
    return {
        k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v
        for k, v in target.items()
    }
