"""cifar10_det: a deterministic detection data set made of the real CIFAR-10 images, written in
the COCO layout, so that detection trains and evaluates through the same COCO code path as a
user's own data.

No detection data set can be fetched where this project is built and tested; CIFAR-10 is at
hand. Each canvas (128 x 128 by default) is a background made from another image of the same
split, enlarged and blurred, with 1-4 objects pasted on it: CIFAR images resized to 16-64 px at
random places, each object's box the pasted image's extent and its category its CIFAR class.
Objects may overlap partly (IoU <= 0.3 with every earlier one, and none hidden by more than
half). Train canvases use train images only, val canvases test images only. Everything follows
from the seed and the index of the canvas, so two builds are byte-identical; a build writes a
manifest last, and a second call with the same settings reuses it.

    python -m compress.data.cifar_det OUT_DIR [--cifar DIR] [--train N] [--val N] [--size S]

Layout: OUT_DIR/annotations/instances_{train,val}2017.json, OUT_DIR/{train,val}2017/*.jpg.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from compress.data.datasets import CIFAR10_CLASSES, Split, load_cifar10
from compress.errors import DataError

MANIFEST = "cifar10_det.json"
CLASSES = tuple(CIFAR10_CLASSES)


@dataclass(frozen=True)
class Settings:
    train: int = 4000  # canvases per split
    val: int = 1000
    size: int = 128  # canvas side, px
    min_obj: int = 16  # object side, px
    max_obj: int = 64
    max_objects: int = 4
    max_iou: float = 0.3
    seed: int = 0
    quality: int = 95  # JPEG


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def _covered(under: tuple[int, int, int, int], over: tuple[int, int, int, int]) -> float:
    """The share of `under` that `over` hides."""
    ux, uy, uw, uh = under
    ox, oy, ow, oh = over
    iw = max(0, min(ux + uw, ox + ow) - max(ux, ox))
    ih = max(0, min(uy + uh, oy + oh) - max(uy, oy))
    return iw * ih / (uw * uh)


def _pil(split: Split, i: int) -> Image.Image:
    return Image.fromarray(split.images[i].permute(1, 2, 0).numpy())


def canvas(
    split: Split, index: int, settings: Settings, split_id: int
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Canvas `index` of a split: the image and its objects ({bbox [x, y, w, h], category_id,
    source}: `source` is the CIFAR index the object was made from)."""
    s = settings
    rng = np.random.default_rng([s.seed, split_id, index])
    n = len(split)
    bg = _pil(split, int(rng.integers(n))).resize((s.size, s.size), Image.BILINEAR)
    img = bg.filter(ImageFilter.GaussianBlur(radius=3))
    objects: list[dict[str, Any]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, s.max_objects + 1))):
        src = int(rng.integers(n))
        side = int(rng.integers(s.min_obj, s.max_obj + 1))
        for _try in range(20):
            x, y = (int(v) for v in rng.integers(0, s.size - side + 1, size=2))
            box = (x, y, side, side)
            ok = all(_iou(box, b) <= s.max_iou and _covered(b, box) <= 0.5 for b in boxes)
            if ok:
                break
        else:
            continue  # no free place for this one: the canvas has fewer objects
        img.paste(_pil(split, src).resize((side, side), Image.BILINEAR), (x, y))
        boxes.append(box)
        label = int(split.labels[src])
        objects.append({"bbox": list(box), "category_id": label + 1, "source": src})
    return img, objects


def _write_split(
    out: Path, name: str, split: Split, count: int, settings: Settings, split_id: int
) -> None:
    folder = out / f"{name}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img, objects = canvas(split, i, settings, split_id)
        file_name = f"{i:06d}.jpg"
        img.save(folder / file_name, quality=settings.quality)
        images.append(
            {"id": i + 1, "file_name": file_name, "width": settings.size, "height": settings.size}
        )
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "area": w * h,
                    "iscrowd": 0,
                    **obj,
                }
            )
    coco = {
        "info": {"description": f"cifar10_det {name}: CIFAR-10 {name} objects on canvases"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)],
    }
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{name}2017.json").write_text(json.dumps(coco))


def build(out: str | Path, cifar_root: str | Path, settings: Settings = Settings()) -> Path:
    """Write the data set into `out` (or reuse the one there when it was built with the same
    settings); returns `out`. `cifar_root` holds cifar-10-batches-py."""
    out = Path(out)
    wanted = {"settings": asdict(settings), "classes": list(CLASSES)}
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == wanted:
                return out
        except json.JSONDecodeError:
            pass
    if out.exists() and any(out.iterdir()) and not manifest.is_file():
        raise DataError(
            f"{out} is not empty and holds no {MANIFEST}: not overwritten; pass an empty or "
            "new folder"
        )
    for sub in ("annotations", "train2017", "val2017"):  # a build with other settings
        shutil.rmtree(out / sub, ignore_errors=True)
    manifest.unlink(missing_ok=True)
    data = load_cifar10(Path(cifar_root))
    if settings.max_obj > settings.size or settings.min_obj < 1:
        raise DataError(
            f"cifar10_det: objects of {settings.min_obj}-{settings.max_obj} px do not fit "
            f"{settings.size} px canvases"
        )
    _write_split(out, "train", data.train, settings.train, settings, 0)
    _write_split(out, "val", data.test, settings.val, settings, 1)
    manifest.write_text(json.dumps(wanted, indent=1))  # last: a complete build
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--cifar", default="data", help="folder holding cifar-10-batches-py")
    d = Settings()
    ap.add_argument("--train", type=int, default=d.train)
    ap.add_argument("--val", type=int, default=d.val)
    ap.add_argument("--size", type=int, default=d.size)
    ap.add_argument("--seed", type=int, default=d.seed)
    args = ap.parse_args(argv)
    s = Settings(train=args.train, val=args.val, size=args.size, seed=args.seed)
    try:
        out = build(args.out, args.cifar, s)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {s.train} train and {s.val} val canvases of {s.size} px")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
