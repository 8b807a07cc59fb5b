"""Detection data sets by name, as the `dataset` config group gives them: `coco` (a folder in
the COCO 2017 layout: a user's own data or COCO itself) and `cifar10_det` (built once from the
CIFAR-10 images under `root` into `root/cifar10_det`, then read through the same COCO code).
Which task a run is follows from here: these names train detectors, every other data set a
classifier (`check_model_fits_data`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.data import cifar_det
from compress.data.coco import CocoDetection, collate, eval_transforms, train_transforms
from compress.data.folder import EpochSampler, SeededSamples, leave_stop_signals
from compress.detection.models import is_detector
from compress.errors import ConfigError

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]

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

    in_channels = 3  # RGB: what torchvision's detectors read

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The images the detector's core reads (its transform resizes every image to this)."""
        return (3, self.image_size, self.image_size)

    def loaders(
        self,
        batch_size: int,
        eval_batch_size: int,
        device: torch.device | str = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        shard: tuple[int, int] | None = None,
        workers: int = 0,
    ) -> tuple[DetectionLoader, DetectionLoader]:
        """The engine's (train, test) loaders (compress.engine.make_loaders' streaming form);
        `shard=(rank, world)`: this rank's part of each (torchrun)."""
        train = DetectionLoader(self.train, batch_size, device, True, seed, workers, shard)
        test = DetectionLoader(self.test, eval_batch_size, device, False, seed, workers, shard)
        return train, test


class DetectionLoader:
    """(images, targets) batches on `device`, as lists (the sizes and box counts differ), with
    TensorLoader's interface: the order of epoch k and each image's augmentation depend only on
    (seed, k, index), and `set_epoch(k, start)` resumes inside an epoch without reading the
    batches before `start`. Training drops a last partial batch (unless it is the only one).

    `shard=(rank, world)` (torchrun): as TensorLoader shards, each training step's
    `batch_size * world` images of the one permutation every rank draws are split rank, rank +
    world, ... (the images no rank reads, n % world, dropped); evaluation reads images rank,
    rank + world, ... Augmentation follows the image's index, so it is the same on any world."""

    def __init__(
        self,
        split: CocoDetection,
        batch_size: int,
        device: torch.device | str = "cpu",
        train: bool = False,
        seed: int = 0,
        workers: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} is invalid: expected a positive integer")
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.device, self.workers = torch.device(device), workers
        self.shard = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
        self.epoch, self.start = 0, 0

    def _samples(self) -> int:
        """How many images this rank reads per epoch."""
        rank, world = self.shard
        n = len(self.split)
        return n // world if self.train else len(range(rank, n, world))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n, b = self._samples(), self.batch_size
        return n // b if self.train and n >= b else -(-n // b)

    def __iter__(self) -> Iterator[Batch]:
        base_seed = self.seed * 100003 + self.epoch
        order = EpochSampler(len(self.split), self.train, self.seed, self.epoch).indices()
        rank, world = self.shard
        # a step's batch_size * world images start at a multiple of world: position rank,
        # rank + world, ... of each step is position rank, rank + world, ... of the epoch
        order = order[: self._samples() * world][rank::world] if self.train else order[rank::world]
        loader = torch.utils.data.DataLoader(
            SeededSamples(self.split, base_seed) if self.train else self.split,
            batch_size=self.batch_size,
            sampler=order[self.start * self.batch_size :].tolist(),
            num_workers=self.workers,
            drop_last=self.train and self._samples() >= self.batch_size,
            collate_fn=collate,
            worker_init_fn=leave_stop_signals,
            generator=torch.Generator().manual_seed(base_seed),
        )
        for images, targets in loader:
            yield (
                [im.to(self.device) for im in images],
                [{k: _to(v, self.device) for k, v in t.items()} for t in targets],
            )


def _to(v: Any, device: torch.device) -> Any:
    return v.to(device) if isinstance(v, torch.Tensor) else v


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


def check_model_fits_data(model_cfg: dict[str, Any], dataset_name: str | None) -> None:
    """A classifier on a detection data set, or a detector on a classification one, is one
    line naming the fix."""
    source = model_cfg.get("source")
    detector = source in DETECTION_MODEL_SOURCES
    model = model_cfg.get("name") or source
    if source == "custom":  # a user's builder: what it builds is checked (check_is_detector)
        return
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


def check_is_detector(model: nn.Module, dataset_name: str, what: str) -> None:
    """A model built for a detection data set must have torchvision's detection interface."""
    if not is_detector(model):
        raise ConfigError(
            f"{what} built a {type(model).__name__}, and dataset={dataset_name} trains "
            "detectors: the model needs torchvision's detection interface (transform, backbone, "
            "and head or rpn; losses in training mode, detections in eval mode)"
        )
