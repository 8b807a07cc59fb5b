"""Detection data sets by name, as the `dataset` config group gives them: `coco` (a folder in
the COCO 2017 layout: a user's own data or COCO itself) and `cifar10_det` (built once from the
CIFAR-10 images under `root` into `root/cifar10_det`, then read through the same COCO code).
Which task a run is follows from here: these names train detectors, every other data set a
classifier (`check_model_fits_data`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.data import cifar_det
from compress.data.coco import CocoDetection, collate, eval_transforms, train_transforms
from compress.errors import ConfigError

DETECTION_DATASETS = ("coco", "cifar10_det")
DETECTION_MODEL_SOURCES = ("torchvision_det",)


@dataclass
class DetectionData:
    name: str
    train: CocoDetection
    test: CocoDetection
    classes: list[str]
    image_size: int

    @property
    def num_classes(self) -> int:
        """What a torchvision detector is built with: the classes and the background (0)."""
        return len(self.classes) + 1


def is_detection_dataset(name: str | None) -> bool:
    return name in DETECTION_DATASETS


def load_detection_data(cfg: dict[str, Any]) -> DetectionData:
    """The train / val splits of `cfg` (the `dataset` group) with their transforms (random
    flip, scale jitter and colour on train; a resize on val; boxes move with the image)."""
    name = cfg.get("name")
    if not is_detection_dataset(name):
        raise ConfigError(
            f"dataset={name} is not a detection data set: expected one of "
            f"{', '.join(DETECTION_DATASETS)}"
        )
    size = cfg.get("image_size", 128)
    if not isinstance(size, int) or size < 32:
        raise ConfigError(f"dataset.image_size={size} is invalid: expected an integer >= 32")
    root = Path(str(cfg.get("root") or "data"))
    if name == "cifar10_det":  # built on first use, reused after (its manifest says how)
        settings = cifar_det.Settings(
            train=int(cfg.get("num_train", cifar_det.Settings.train)),
            val=int(cfg.get("num_val", cifar_det.Settings.val)),
        )
        out = Path(str(cfg.get("build_dir") or root / "cifar10_det"))
        root = cifar_det.build(out, root, settings)
    train = CocoDetection(root, "train", train_transforms(size))
    test = CocoDetection(root, "val", eval_transforms(size))
    if train.index.classes != test.index.classes:
        raise ConfigError(
            f"dataset.root={root}: the train and val annotation files list different categories"
        )
    return DetectionData(str(name), train, test, train.index.classes, size)


def loaders(
    data: DetectionData, batch_size: int, seed: int = 0, workers: int = 0
) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Shuffled (seeded) training batches and ordered evaluation batches, as lists."""
    g = torch.Generator().manual_seed(seed)
    common = {"batch_size": batch_size, "collate_fn": collate, "num_workers": workers}
    train = torch.utils.data.DataLoader(data.train, shuffle=True, generator=g, **common)
    test = torch.utils.data.DataLoader(data.test, shuffle=False, **common)
    return train, test


def check_model_fits_data(model_cfg: dict[str, Any], dataset_name: str | None) -> None:
    """A classifier on a detection data set, or a detector on a classification one, is one
    line naming the fix."""
    detector = model_cfg.get("source") in DETECTION_MODEL_SOURCES
    model = model_cfg.get("name") or model_cfg.get("source")
    if is_detection_dataset(dataset_name) and not detector:
        raise ConfigError(
            f"model={model} is a classifier and dataset={dataset_name} a detection data set: "
            "use model=torchvision_det model.name=ssdlite320_mobilenet_v3_large (or another "
            "torchvision detector)"
        )
    if detector and not is_detection_dataset(dataset_name):
        raise ConfigError(
            f"model.name={model} is a detector and dataset={dataset_name} a classification "
            f"data set: use dataset=coco dataset.root=DIR or dataset=cifar10_det"
        )
