"""A detector whose core runs in another runtime (ONNX Runtime): the exported file holds the
traceable core only (backbone, neck, heads: images in, raw head outputs out); the input
transform, the anchors, the box decoding and NMS stay the PyTorch detector's own, run in
Python around the runtime's outputs. So the file is what an integer kernel can run, and the
boxes are decoded by the same code that trained and evaluated the model.

One-stage detectors (SSD / SSDlite, RetinaNet, FCOS): their heads return one tensor per output
kind over all anchors (RetinaNet and FCOS decode them split per feature map, as their forward
does). Two-stage detectors need the features for their second stage, so they are refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.ssd import SSD

from compress.detection.models import core_of
from compress.errors import ConfigError

RunCore = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def check_exportable(model: nn.Module, name: str) -> None:
    """One line for a detector whose post-processing the runtime path does not cover."""
    if not isinstance(model, SSD | RetinaNet | FCOS):
        raise ConfigError(
            f"export of {name}: the runtime path decodes one-stage detectors only (SSD / "
            f"SSDlite, RetinaNet, FCOS); {type(model).__name__} needs its features for a second "
            "stage. Export an ssdlite320_mobilenet_v3_large, retinanet_* or fcos_* checkpoint"
        )


class CoreOutputs(nn.Module):
    """The core's outputs as a tuple in a fixed key order: what the exported graph returns."""

    def __init__(self, detector: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.core, self.keys = core_of(detector), keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.core(x)
        return tuple(out[k] for k in self.keys)


@torch.no_grad()
def output_keys(detector: nn.Module, image_size: int) -> tuple[str, ...]:
    out = core_of(detector.eval())(torch.zeros(1, 3, image_size, image_size))
    return tuple(sorted(out))


class RuntimeDetector(nn.Module):
    """`detector`'s forward at evaluation, with its core replaced by `run_core` (a batch of
    transformed images -> the raw outputs in `keys` order): the same boxes, scores and labels
    when the runtime computes what the core does."""

    def __init__(self, detector: nn.Module, run_core: RunCore, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.detector, self.run_core, self.keys = detector.eval(), run_core, keys
        self._shapes: dict[tuple[int, int], list[torch.Size]] = {}

    def _feature_shapes(self, x: torch.Tensor) -> list[torch.Size]:
        """The feature maps' shapes at this image size (the anchors depend on nothing else)."""
        key = (x.shape[-2], x.shape[-1])
        if key not in self._shapes:
            with torch.no_grad():
                feats = self.detector.backbone(x[:1])
            maps = feats.values() if isinstance(feats, dict) else [feats]
            self._shapes[key] = [f.shape[1:] for f in maps]
        return self._shapes[key]

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        d = self.detector
        sizes = [tuple(im.shape[-2:]) for im in images]
        batch, _ = d.transform(images)
        x = batch.tensors
        outs = dict(zip(self.keys, self.run_core(x), strict=True))
        shapes = self._feature_shapes(x)
        features = [x.new_zeros(len(images), *s) for s in shapes]  # only their sizes are read
        anchors = d.anchor_generator(batch, features)
        if not isinstance(d, SSD):  # RetinaNet / FCOS decode per feature map, A anchors a place
            places = [s[-2] * s[-1] for s in shapes]
            per_place = next(iter(outs.values())).shape[1] // sum(places)
            split = [n * per_place for n in places]
            outs = {k: list(v.split(split, dim=1)) for k, v in outs.items()}
            anchors = [list(a.split(split)) for a in anchors]
        detections = d.postprocess_detections(outs, anchors, batch.image_sizes)
        return d.transform.postprocess(detections, batch.image_sizes, sizes)


def box_agreement(
    want: list[dict[str, torch.Tensor]], got: list[dict[str, torch.Tensor]]
) -> tuple[int, float]:
    """(images whose detections match: the same count of each label, the largest distance in
    pixels from one of `want`'s boxes to the nearest `got` box of its label over those). Near
    ties in score may order two detections either way after NMS: matched as sets, not lists."""
    same, worst = 0, 0.0
    for a, b in zip(want, got, strict=True):
        if not torch.equal(a["labels"].sort().values, b["labels"].sort().values):
            continue
        same += 1
        if len(a["boxes"]):
            dist = (a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1)
            dist[a["labels"][:, None] != b["labels"][None, :]] = float("inf")
            worst = max(worst, float(dist.amin(1).max()))
    return same, worst
