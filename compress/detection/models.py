"""torchvision's detectors at a size that trains on a CPU: the same models, with the input
transform set to a fixed square size (SSDlite's 320 px, Faster R-CNN's 800-1333 px are far more
than a 128 px canvas needs) and every weight built fresh or from a local file."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

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


# one-stage FPN detectors: their backbone and FPN width can be chosen (`backbone`, `fpn_channels`)
FPN_ONE_STAGE = {"fcos": FCOS, "retinanet": RetinaNet}


def build_detector(
    name: str,
    num_classes: int,
    image_size: int,
    backbone: str | None = None,
    fpn_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """torchvision detector `name` with `num_classes` classes (background included: the data
    set's largest category id + 1), untrained, reading `image_size` x `image_size` images.
    `backbone` / `fpn_channels` (FCOS and RetinaNet only; None: the name's ResNet-50 and 256):
    a torchvision classifier's stride 8 / 16 / 32 stages under an FPN that wide, so an FPN
    detector fits a CPU budget. `kwargs` go to torchvision's builder or the detector class."""
    check_detector_name(name)
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"model.image_size={image_size} is invalid: expected an integer >= 32")
    family = name.split("_")[0]
    if backbone is None and fpn_channels is None:
        model = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
    elif family not in FPN_ONE_STAGE:
        raise ConfigError(
            f"model.backbone / model.fpn_channels are for the one-stage FPN detectors "
            f"({', '.join(f'{k}_*' for k in FPN_ONE_STAGE)}), not {name}: leave them null"
        )
    else:
        body = fpn_backbone(backbone or "resnet50", fpn_channels or 256, family)
        model = FPN_ONE_STAGE[family](body, num_classes, **kwargs)
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


def fpn_backbone(name: str, channels: int, family: str = "fcos") -> BackboneWithFPN:
    """The stride 8 / 16 / 32 stages of torchvision classifier `name` (untrained) under an FPN
    of `channels` channels with P6 and P7 from P5 (RetinaNet's and FCOS's five levels). The
    stages are found by running the body's children in order, up to the first that does not
    read its predecessor's map: a ResNet-like model's own children, or its `features`
    Sequential (MobileNet, EfficientNet, ConvNeXt, ...)."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"model.backbone={name} is not a torchvision classifier")
    if not isinstance(channels, int) or channels < 8 or (family == "fcos" and channels % 32):
        need = "a multiple of 32 (FCOS's head has GroupNorm(32))" if family == "fcos" else ">= 8"
        raise ConfigError(f"model.fpn_channels={channels} is invalid: expected {need}")
    net = torchvision.models.get_model(name, weights=None)
    features = getattr(net, "features", None)
    body = features if isinstance(features, nn.Sequential) else net
    stages: dict[int, tuple[str, int]] = {}  # stride -> (the last child at it, its channels)
    x, size = torch.zeros(1, 3, 128, 128), 128
    with torch.no_grad():
        for child_name, child in body.eval().named_children():
            try:
                x = child(x)
            except Exception:  # a child that does not read its predecessor's map: the end
                break
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or size // x.shape[-1] > 32:
                break
            stages[size // x.shape[-1]] = (child_name, x.shape[1])
    if any(s not in stages for s in (8, 16, 32)):
        raise ConfigError(
            f"model.backbone={name}: no stride 8 / 16 / 32 stages among its children (a "
            "ResNet-like model or one with a `features` Sequential is expected)"
        )
    names, widths = zip(*(stages[s] for s in (8, 16, 32)), strict=True)
    return BackboneWithFPN(
        body.train(),
        {n: str(i) for i, n in enumerate(names)},
        list(widths),
        channels,
        extra_blocks=LastLevelP6P7(channels, channels),
    )


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
