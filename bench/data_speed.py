"""Throughput of the streaming image-folder loaders (compress/data/folder.py), by worker count.

    python bench/data_speed.py [--root DIR] [--classes 10] [--per-class 50] [--workers 0,1,2]

Without --root, writes classes x per-class JPEGs of about 256x256 (train/ and val/) into a
temporary folder. Prints images/s of the training loader (RandomResizedCrop + flip) and the
eval loader (Resize + CenterCrop) at --size, for each worker count: over the whole epoch
(worker start-up included, as every epoch pays it), after the first batch (steady state), and
of the bare DataLoader's uint8 batches (the workers' rate, before normalization in the main
process). Best of --repeats passes.
Every number is measured in this run on this machine; the host's CPU count is printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from compress.data import FolderLoader, load_image_folder_stream


def write_jpegs(root: Path, classes: int, per_class: int, side: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain) of side x (side +- 15%) pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(1, per_class // 5))):
        for c in range(classes):
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h = side
                w = int(side * rng.uniform(0.85, 1.15))
                low = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
                img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
                grain = rng.normal(0, 12, (h, w, 3))
                arr = np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:05d}.jpg", quality=90)


def measure(batches) -> tuple[int, float, float]:
    """(images, images/s over the pass, images/s after the first batch) of one pass."""
    n = n_first = 0
    t_first = None
    t0 = time.perf_counter()
    for _, y in batches:
        n += len(y)
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    t1 = time.perf_counter()
    return n, n / (t1 - t0), (n - n_first) / max(t1 - t_first, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, help="an image folder (default: generate one)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=50, help="training images per class")
    p.add_argument("--side", type=int, default=256, help="generated images' height")
    p.add_argument("--size", type=int, default=224, help="image_size of the loaders")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--repeats", type=int, default=2, help="passes per case; the best is kept")
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process only normalizes; workers get the cores

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            t0 = time.perf_counter()
            write_jpegs(root, args.classes, args.per_class, args.side)
            print(
                f"wrote {args.classes} x {args.per_class} train JPEGs (~{args.side} px) in "
                f"{time.perf_counter() - t0:.1f}s"
            )
        ds = load_image_folder_stream(root, image_size=args.size)
        print(
            f"{root}: {len(ds.train)} train / {len(ds.test)} val images, "
            f"{ds.num_classes} classes; image_size {args.size}, batch {args.batch}; "
            f"{os.cpu_count()} CPUs"
        )
        print(f"{'loader':<6} {'workers':>7} {'images':>7} {'img/s':>7} {'steady':>7} {'uint8':>7}")
        for split, train in (("train", True), ("eval", False)):
            for w in (int(s) for s in args.workers.split(",")):
                loader = FolderLoader(
                    getattr(ds, "train" if train else "test"),
                    args.batch,
                    ds.mean,
                    ds.std,
                    train=train,
                    workers=w,
                )
                runs, raw = [], []
                for r in range(args.repeats):
                    loader.set_epoch(r)
                    runs.append(measure(loader))
                    raw.append(measure(loader.dataloader())[1])
                n, rate, steady = max(runs, key=lambda m: m[1])
                print(f"{split:<6} {w:>7} {n:>7} {rate:>7.0f} {steady:>7.0f} {max(raw):>7.0f}")
        print(
            "img/s: normalized float batches as training sees them, worker start-up included; "
            "steady: after the first batch; uint8: the DataLoader alone (no normalization)"
        )


if __name__ == "__main__":
    main()
