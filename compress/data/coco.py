"""Detection data in the COCO layout (COCO 2017 itself, a user's own data, cifar10_det):
`annotations/instances_{split}2017.json` beside `{split}2017/` image folders.

The annotation file is checked before anything trains on it, and every fault is one line naming
the file and the annotation: a box outside its image or of non-positive size, a category id
the file does not list, an annotation of an image the file does not list, an image file that
is missing. An image without annotations is a background image, not a fault. Samples are
(image, target) with the image a uint8 `tv_tensors.Image` and target {"boxes": XYXY
`tv_tensors.BoundingBoxes`, "labels": int64 (contiguous 1..K, COCO's ids mapped in order),
"image_id": int}, so torchvision's transforms v2 move the boxes with the image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from compress.errors import DataError

SPLITS = ("train", "val")


@dataclass
class CocoIndex:
    """A checked annotation file: images, their boxes (XYXY) and contiguous labels."""

    path: Path
    images: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    boxes: dict[int, list[list[float]]] = field(default_factory=dict)
    labels: dict[int, list[int]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in self.categories]


def annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def read_index(root: str | Path, split: str) -> CocoIndex:
    """Read and check `split`'s annotation file under `root` (see the module doc)."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"COCO split {split!r}: expected one of {', '.join(SPLITS)}")
    path = annotation_file(root, split)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: a COCO data set holds annotations/instances_{split}2017.json "
            f"beside {split}2017/"
        )
    try:
        coco = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not a JSON file ({e})") from None
    if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= coco.keys():
        raise DataError(
            f"{path} is not a COCO annotation file (no images / annotations / categories)"
        )
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(categories)}  # 0 is the background
    images = {im["id"]: im for im in coco["images"]}
    index = CocoIndex(path, list(images.values()), categories)
    folder = root / f"{split}2017"
    for im in index.images:
        if not (folder / im["file_name"]).is_file():
            raise DataError(
                f"{path}: image {im['id']} is {folder / im['file_name']}, which is missing"
            )
        index.boxes[im["id"]], index.labels[im["id"]] = [], []
    for ann in coco["annotations"]:
        where = f"{path}: annotation {ann.get('id')}"
        im = images.get(ann["image_id"])
        if im is None:
            raise DataError(f"{where} is of image {ann['image_id']}, which the file does not list")
        if ann["category_id"] not in label_of:
            known = ", ".join(str(c) for c in label_of)
            raise DataError(f"{where} has category {ann['category_id']}, not one of {known}")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            raise DataError(f"{where} has a box of non-positive size ({w} x {h})")
        if x < 0 or y < 0 or x + w > im["width"] or y + h > im["height"]:
            raise DataError(
                f"{where}: its box [{x}, {y}, {w}, {h}] lies outside its {im['width']} x "
                f"{im['height']} image"
            )
        if ann.get("iscrowd", 0):
            continue  # crowd regions are for evaluation only, as in torchvision's references
        index.boxes[im["id"]].append([x, y, x + w, y + h])
        index.labels[im["id"]].append(label_of[ann["category_id"]])
    return index


class CocoDetection(torch.utils.data.Dataset):
    """(image, target) samples of one split; `transforms` (v2) see both."""

    def __init__(self, root: str | Path, split: str, transforms: Any = None) -> None:
        self.root, self.split = Path(root), split
        self.index = read_index(root, split)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.index.images)

    def __getitem__(self, i: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        im = self.index.images[i]
        with Image.open(self.root / f"{self.split}2017" / im["file_name"]) as f:
            image = tv_tensors.Image(v2.functional.pil_to_tensor(f.convert("RGB")))
        boxes = torch.tensor(self.index.boxes[im["id"]], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes, format="XYXY", canvas_size=(im["height"], im["width"])
            ),
            "labels": torch.tensor(self.index.labels[im["id"]], dtype=torch.int64),
            "image_id": int(im["id"]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def train_transforms(size: int) -> v2.Compose:
    """Flip, a scale jitter and photometric noise that move the boxes with the image; boxes
    left without area are dropped."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.ColorJitter(0.2, 0.2, 0.2),
            v2.SanitizeBoundingBoxes(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transforms(size: int) -> v2.Compose:
    return v2.Compose(
        [v2.Resize((size, size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    )


def collate(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """Detection batches are lists: images and their box counts differ."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
