"""cifar10_det (compress/data/cifar_det.py): the detection set built from the real CIFAR-10
images, in COCO layout."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from compress.data.cifar_det import MANIFEST, Settings, _iou, build, canvas
from compress.data.datasets import load_cifar10
from compress.errors import DataError

TINY = Settings(train=24, val=12)


@pytest.fixture(scope="module")
def cifar(cifar_root):
    return load_cifar10(cifar_root)


def coco(out, split="val"):
    return json.loads((out / "annotations" / f"instances_{split}2017.json").read_text())


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_two_builds_are_byte_identical_and_coco_shaped(cifar_root, tmp_path):
    a, b = build(tmp_path / "a", cifar_root, TINY), build(tmp_path / "b", cifar_root, TINY)
    for split, n in (("train", TINY.train), ("val", TINY.val)):
        ca = coco(a, split)
        assert ca == coco(b, split)
        assert [im["id"] for im in ca["images"]] == list(range(1, n + 1))
        for im in ca["images"]:
            name = f"{split}2017/{im['file_name']}"
            assert (a / name).read_bytes() == (b / name).read_bytes()
            assert Image.open(a / name).size == (TINY.size, TINY.size)
        per_image: dict[int, list] = {}
        for ann in ca["annotations"]:
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= TINY.size and y + h <= TINY.size
            assert TINY.min_obj <= w == h <= TINY.max_obj and ann["area"] == w * h
            assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] == 0
            per_image.setdefault(ann["image_id"], []).append(ann["bbox"])
        assert set(per_image) <= {im["id"] for im in ca["images"]}
        assert all(1 <= len(v) <= TINY.max_objects for v in per_image.values())
        for boxes in per_image.values():  # partial overlaps at most
            assert all(_iou(tuple(p), tuple(q)) <= TINY.max_iou for p, q in combinations(boxes, 2))
        assert [c["name"] for c in ca["categories"]][:2] == ["airplane", "automobile"]


def test_each_object_is_its_cifar_image_and_class_from_its_own_split(cifar):
    for split, split_id in ((cifar.train, 0), (cifar.test, 1)):
        for i in range(10):
            img, objects = canvas(split, i, TINY, split_id)
            top = objects[-1]  # pasted last: nothing covers it
            x, y, w, h = top["bbox"]
            want = Image.fromarray(split.images[top["source"]].permute(1, 2, 0).numpy())
            got = np.asarray(img.crop((x, y, x + w, y + h)))
            assert np.array_equal(got, np.asarray(want.resize((w, h), Image.BILINEAR)))
            assert top["category_id"] == int(split.labels[top["source"]]) + 1


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_val_canvases_hold_test_images_only(cifar_root, cifar, tmp_path):
    out = build(tmp_path / "d", cifar_root, TINY)
    ann = coco(out)["annotations"][0]
    x, y, w, h = ann["bbox"]
    img = Image.open(out / "val2017" / "000000.jpg").convert("RGB")
    got = np.asarray(img.crop((x, y, x + w, y + h)), dtype=np.float32)

    def err(split):
        src = Image.fromarray(split.images[ann["source"]].permute(1, 2, 0).numpy())
        return np.abs(np.asarray(src.resize((w, h), Image.BILINEAR), dtype=np.float32) - got)

    # the first object may be partly covered: compare medians (JPEG moves pixels a little)
    assert np.median(err(cifar.test)) < 8 < np.median(err(cifar.train))


@pytest.mark.slow  # heavy for the fast suite (make test-slow)
def test_a_second_build_reuses_the_first_and_other_settings_rebuild(cifar_root, tmp_path):
    out = build(tmp_path / "d", cifar_root, TINY)
    stamp = (out / MANIFEST).stat().st_mtime_ns, (out / "val2017" / "000000.jpg").stat().st_mtime_ns
    build(out, cifar_root, TINY)
    assert (
        (out / MANIFEST).stat().st_mtime_ns,
        (out / "val2017" / "000000.jpg").stat().st_mtime_ns,
    ) == stamp
    build(out, cifar_root, Settings(train=6, val=3))
    assert len(coco(out)["images"]) == 3 and not (out / "train2017" / "000010.jpg").exists()


def test_a_folder_that_holds_something_else_is_not_overwritten(cifar_root, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(
        DataError, match="is not empty and holds no cifar10_det.json: not overwritten"
    ):
        build(tmp_path, cifar_root, TINY)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
