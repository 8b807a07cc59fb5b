"""torchvision's detectors at a size that trains on a CPU: the same models, with the input
transform set to a fixed square size (SSDlite's 320 px, Faster R-CNN's 800-1333 px are far more
than a 128 px canvas needs) and every weight built fresh or from a local file."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from compress.errors import ConfigError

# the detectors whose core (backbone, neck, heads) the rest of the tool has been checked on
DETECTORS = (
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fcos_resnet50_fpn",
    "retinanet_resnet50_fpn",
)


def detector_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models.detection)


def check_detector_name(name: str | None) -> None:
    names = detector_names()
    if name not in names:
        raise ConfigError(
            f"model.name={name} is not a torchvision detector: expected one of "
            f"{', '.join(sorted(names))}"
        )


def build_detector(name: str, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """torchvision detector `name` with `num_classes` classes (background included: the data
    set's largest category id + 1), untrained, reading `image_size` x `image_size` images.
    `kwargs` go to torchvision's builder (e.g. trainable_backbone_layers)."""
    check_detector_name(name)
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"model.image_size={image_size} is invalid: expected an integer >= 32")
    model = torchvision.models.get_model(
        name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )
    old = model.transform
    model.transform = GeneralizedRCNNTransform(
        image_size,
        image_size,
        old.image_mean,
        old.image_std,
        size_divisible=old.size_divisible,
        fixed_size=(image_size, image_size) if old.fixed_size is not None else None,
    )
    if hasattr(model, "detections_per_img"):  # COCO mAP counts each image's 100 best
        model.detections_per_img = min(model.detections_per_img, 100)
    return model


def is_detector(model: nn.Module) -> bool:
    """A model with torchvision's detection interface: an input transform, a backbone, and a
    head (one-stage: SSD, RetinaNet, FCOS) or a region proposal network (two-stage)."""
    return all(hasattr(model, k) for k in ("transform", "backbone")) and (
        hasattr(model, "head") or hasattr(model, "rpn")
    )


def core_of(model: nn.Module) -> nn.Module:
    """What quantization, pruning, fusion and export see of `model`: a detector's traceable
    core (DetectorCore), any other model itself."""
    return DetectorCore(model) if is_detector(model) else model


class DetectorCore(nn.Module):
    """backbone (+ FPN) -> head of a one-stage torchvision detector (SSD, RetinaNet, FCOS),
    or backbone (+ FPN) -> RPN head of a two-stage one; shares the detector's modules, so
    what is done to the core's layers (quantizers, thinning) is done to the detector's."""

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
