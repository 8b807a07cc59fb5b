"""COCO-layout detection data (compress/data/coco.py): boxes through transforms v2, labels,
background images, and one line for every fault of an annotation file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from compress.data.coco import CocoDetection, collate, eval_transforms, read_index, train_transforms
from compress.errors import DataError

COCO = {
    "images": [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 11, "file_name": "b.png", "width": 40, "height": 30},  # a background image
    ],
    "annotations": [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [5, 4, 10, 8], "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 10, 20, 20], "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},
    ],
    "categories": [
        {"id": 7, "name": "seven"},
        {"id": 1, "name": "one"},
        {"id": 3, "name": "three"},
    ],
}


def write(root: Path, coco: dict, split: str = "val") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for im in coco["images"]:
        Image.new("RGB", (im["width"], im["height"]), (30, 60, 90)).save(
            root / f"{split}2017" / im["file_name"]
        )
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def test_boxes_labels_and_background_images(tmp_path):
    ds = CocoDetection(write(tmp_path, COCO), "val")
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.uint8
    assert target["boxes"].tolist() == [[5, 4, 15, 12], [20, 10, 40, 30]]  # XYXY
    # COCO ids 1, 3, 7 are labels 1, 2, 3 (0: background); the crowd region is not a target
    assert target["labels"].tolist() == [2, 3] and ds.index.classes == ["one", "three", "seven"]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].tolist() == []
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == 11


def test_a_flip_moves_a_known_box_with_the_image(tmp_path):
    ds = CocoDetection(write(tmp_path, COCO), "val", v2.RandomHorizontalFlip(p=1.0))
    image, target = ds[0]
    # x' = W - x: [5, 4, 15, 12] -> [25, 4, 35, 12] in a 40-wide image
    assert target["boxes"].tolist()[0] == [25, 4, 35, 12]
    resized = CocoDetection(tmp_path, "val", eval_transforms(60))[0]
    assert resized[0].shape == (3, 60, 60) and resized[0].dtype == torch.float32
    assert resized[1]["boxes"].tolist()[0] == pytest.approx([7.5, 8, 22.5, 24])
    torch.manual_seed(0)
    trained = CocoDetection(tmp_path, "val", train_transforms(32))[0]
    assert trained[0].shape == (3, 32, 32) and len(trained[1]["boxes"]) == len(trained[1]["labels"])


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_cifar10_det_reads_through_the_coco_path(cifar_root, tmp_path):
    from compress.data.cifar_det import Settings, build

    out = build(tmp_path / "det", cifar_root, Settings(train=4, val=4))
    coco = json.loads((out / "annotations" / "instances_val2017.json").read_text())
    ds = CocoDetection(out, "val")
    assert len(ds) == 4 and ds.index.classes[0] == "airplane"
    first = [a for a in coco["annotations"] if a["image_id"] == 1]
    _, target = ds[0]
    want = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in first)]
    assert target["boxes"].tolist() == want
    assert target["labels"].tolist() == [a["category_id"] for a in first]  # ids 1..10 already


def _broken(change) -> dict:
    coco = copy.deepcopy(COCO)
    change(coco)
    return coco


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["annotations"][1].update(bbox=[30, 10, 20, 20]),
            r"annotation 2: its box \[30.0, 10.0, 20.0, 20.0\] lies outside its 40 x 30 image",
        ),
        (
            lambda c: c["annotations"][0].update(bbox=[5, 4, 0, 8]),
            r"annotation 1 has a box of non-positive size \(0.0 x 8.0\)",
        ),
        (
            lambda c: c["annotations"][0].update(category_id=5),
            r"annotation 1 has category 5, not one of 1, 3, 7",
        ),
        (
            lambda c: c["annotations"][0].update(image_id=99),
            r"annotation 1 is of image 99, which the file does not list",
        ),
    ],
)
def test_a_fault_in_the_annotations_is_one_line_naming_file_and_annotation(
    tmp_path, change, message
):
    write(tmp_path, _broken(change))
    with pytest.raises(DataError, match=message) as e:
        read_index(tmp_path, "val")
    assert "instances_val2017.json" in str(e.value) and "\n" not in str(e.value)


def test_missing_files_and_foreign_json_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"instances_val2017.json does not exist: a COCO data set"):
        read_index(tmp_path, "val")
    write(tmp_path, COCO)
    (tmp_path / "val2017" / "b.png").unlink()
    with pytest.raises(DataError, match=r"image 11 is .*b.png, which is missing"):
        read_index(tmp_path, "val")
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"epoch": 1}')
    with pytest.raises(DataError, match="is not a COCO annotation file"):
        read_index(tmp_path, "val")
    with pytest.raises(DataError, match="COCO split 'test': expected one of train, val"):
        read_index(tmp_path, "test")
