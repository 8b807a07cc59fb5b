"""What a detector's training and evaluation need from the engine, in one object (the engine's
Task, as compress.engine.ClassificationTask is the classifier's): its loss
(torchvision detectors compute their own losses in training mode), its metric (COCO mAP) and
the part of the model that quantization, pruning, fusion and export see (`core`: backbone,
neck and heads as one traceable module; the input transform, anchors, box decoding and NMS
stay float and outside)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress.detection.metrics import KEYS, NAMES, DetectionMAP
from compress.detection.models import DetectorCore, core_of
from compress.distributed import Dist
from compress.engine import Step, autocast
from compress.errors import ConfigError

__all__ = ["DetectionTask", "DetectorCore"]

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


class DetectionTask:
    """The engine's Task for (images, targets) batches of torchvision's detection format."""

    name = "detection"
    metric = "map"  # what "best" means: COCO mAP@[.5:.95]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The sum of the detector's own losses (classification and box regression)."""
        images, targets = batch
        losses = model(images, [_plain(t) for t in targets])
        return sum(losses.values())  # type: ignore[return-value]

    def step(self, model: nn.Module, batch: Batch) -> Step:
        return Step(self.loss(model, batch), len(batch[0]), None)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        loader: Iterable[Batch],
        precision: str = "fp32",
        dist: Dist | None = None,
        tta: bool = False,
    ) -> dict[str, float]:
        """COCO mAP@[.5:.95] (`map`), mAP@.5 (`map50`) and per-size AP, in percent. Under
        torchrun (`dist`) each rank detects on its part of the val set and every rank computes
        the mAP of all ranks' detections (gathered), so all agree on it."""
        if tta:
            raise ConfigError("schedule.tta=true is for classifiers: a detector has no flip TTA")
        was = model.training
        model.eval()
        metric = DetectionMAP()
        device = getattr(loader, "device", torch.device("cpu"))
        mine: list[tuple[list[dict], list[dict]]] = []
        for images, targets in loader:
            with autocast(device, precision):
                preds = model(images)
            pair = ([_cpu(p) for p in preds], [_cpu(_plain(t)) for t in targets])
            if dist is not None and dist.enabled:
                mine.append(pair)
            else:
                metric.update(*pair)
        if dist is not None and dist.enabled:
            for pairs in dist.all_gather_object(mine):
                for preds, targets in pairs:
                    metric.update(preds, targets)
        model.train(was)
        return metric.compute()

    def keys(self, tta: bool = False) -> tuple[str, ...]:
        return tuple(NAMES.get(k, k) for k in KEYS)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"test mAP {metrics['map']:.2f} mAP@.5 {metrics['map50']:.2f}"

    def core(self, model: nn.Module) -> nn.Module:
        """The traceable compute of `model`: images (a normalized, resized batch tensor) in,
        the heads' raw outputs out."""
        return core_of(model)


def _cpu(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _plain(target: dict[str, Any]) -> dict[str, Any]:
    """A target as torchvision's detectors take it: plain tensors, not tv_tensors."""
    return {
        k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v
        for k, v in target.items()
    }
