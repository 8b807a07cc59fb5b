"""Data sets as uint8 image tensors in memory, read from their standard on-disk layouts.

Every loader returns a `Split` pair (train, test). Images are kept as uint8 (N, C, H, W) so a
whole CIFAR-10 costs 180 MB, and augmentation runs batched on tensors (see `loader.py`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.data.checks import UNREADABLE, image_folder_layout, refuse_empty_classes
from compress.data.registry import register_dataset
from compress.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int) -> Split:
        """A seeded random subset of `n` samples (all of them when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


@dataclass
class DataSet:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one test image: the input shape for MACs and latency."""
        return tuple(self.test.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _missing(name: str, path: Path, hint: str = "") -> DataError:
    return DataError(
        f"dataset {name}: {path} not found; set dataset.root (or COMPRESS_DATA_DIR) to the folder "
        f"that holds it, or pass dataset.download=true to fetch it{hint}"
    )


# ---------------------------------------------------------------- CIFAR-10
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILES = {  # canonical MD5 sums of the python release
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


# What a CIFAR batch pickle may name: numpy arrays, their dtypes and the bytes inside them
# (as protocols 2 to 5 write them), nothing that runs code.
_CIFAR_GLOBALS = {
    *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python release is pickled: unpickle plain data and numpy arrays only, so a
    foreign pickle in the data folder is refused instead of run."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it refers to {module}.{name}, which a CIFAR batch never does (refused unread)"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Images, labels and the file's MD5, from one read of the file."""
    raw = path.read_bytes()
    try:
        entry = _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as e:  # truncated or foreign file
        raise DataError(f"dataset cifar10: cannot read {path}: {e}") from None
    return data, labels, hashlib.md5(raw).hexdigest()


def _partial(name: str, folder: Path, missing: list[str], expected: str) -> DataError:
    """Some files of a data set are there and some are not: name the missing ones."""
    return DataError(
        f"dataset {name}: {folder} lacks {', '.join(missing)} ({len(missing)} of {expected}); "
        "copy the complete folder, or pass dataset.download=true to fetch the missing files"
    )


@register_dataset
def load_cifar10(root: Path, download: bool = False) -> DataSet:
    folder = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        if not download and len(missing) < len(CIFAR10_FILES):
            raise _partial("cifar10", folder, missing, "data_batch_1..5 and test_batch")
        if not download:
            raise _missing("cifar10", folder)
        from torchvision.datasets.utils import download_and_extract_archive

        log.info("downloading CIFAR-10 to %s", root)
        download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_ARCHIVE_MD5)
    parts = {f: _read_cifar_batch(folder / f) for f in CIFAR10_FILES}
    differ = [f for f, md5 in CIFAR10_FILES.items() if parts[f][2] != md5]
    if differ:
        log.warning(
            "cifar10: %d of 6 files in %s differ from the canonical release (MD5); "
            "using them as they are",
            len(differ),
            folder,
        )
    train_parts = [parts[f"data_batch_{i}"] for i in range(1, 6)]
    train = Split(
        torch.from_numpy(np.concatenate([p[0] for p in train_parts])),
        torch.from_numpy(np.concatenate([p[1] for p in train_parts])),
    )
    x, y, _ = parts["test_batch"]
    test = Split(torch.from_numpy(x), torch.from_numpy(y))
    return DataSet(
        "cifar10",
        train,
        test,
        CIFAR10_CLASSES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


# ---------------------------------------------------------------- MNIST / Fashion-MNIST
_IDX = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None


def _find_idx(root: Path, folders: list[str], stem: str) -> Path | None:
    for folder in folders:
        for suffix in ("", ".gz"):
            p = root / folder / (stem + suffix)
            if p.exists():
                return p
    return None


def _load_idx_dataset(
    name: str,
    root: Path,
    download: bool,
    folders: list[str],
    mirror: str,
    classes: list[str],
    mean: float,
    std: float,
) -> DataSet:
    paths = {k: _find_idx(root, folders, stem) for k, stem in _IDX.items()}
    found = [p for p in paths.values() if p is not None]
    if len(found) < len(paths) and not download:
        if found:  # the folder is there, some files are not
            missing = [f"{_IDX[k]}(.gz)" for k, p in paths.items() if p is None]
            raise _partial(name, found[0].parent, missing, "the 4 IDX files")
        raise _missing(name, root / folders[0], f" (looked in {', '.join(folders)})")
    if len(found) < len(paths):
        from torchvision.datasets.utils import download_url

        for key, stem in _IDX.items():
            if paths[key] is None:
                download_url(mirror + stem + ".gz", str(root / folders[0]))
                paths[key] = root / folders[0] / (stem + ".gz")
    arr = {k: read_idx(p) for k, p in paths.items()}
    train = Split(
        torch.from_numpy(arr["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arr["train_labels"].astype(np.int64)),
    )
    test = Split(
        torch.from_numpy(arr["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arr["test_labels"].astype(np.int64)),
    )
    return DataSet(name, train, test, classes, mean=(mean,), std=(std,))


@register_dataset
def load_mnist(root: Path, download: bool = False) -> DataSet:
    return _load_idx_dataset(
        "mnist",
        root,
        download,
        ["MNIST/raw", "mnist", "."],
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        [str(i) for i in range(10)],
        0.1307,
        0.3081,
    )


@register_dataset
def load_fashion_mnist(root: Path, download: bool = False) -> DataSet:
    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    return _load_idx_dataset(
        "fashion_mnist",
        root,
        download,
        ["FashionMNIST/raw", "fashion-mnist", "."],
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        classes,
        0.2860,
        0.3530,
    )


# ---------------------------------------------------------------- image folders
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _read_folder(folder: Path, classes: list[str], size: int, skip_corrupt: bool = False) -> Split:
    """Every image of one split, decoded and resized; an unreadable one is a DataError naming
    it, or with `skip_corrupt` left out and counted in the log."""
    from PIL import Image

    images, labels, skipped = [], [], []
    counts = [0] * len(classes)
    for label, cls in enumerate(classes):
        for p in sorted((folder / cls).iterdir()):
            if p.suffix.lower() not in _IMAGE_SUFFIXES or not p.is_file():
                continue
            try:
                with Image.open(p) as im:
                    img = im.convert("RGB").resize((size, size), Image.BILINEAR)
            except UNREADABLE as e:
                if not skip_corrupt:
                    raise DataError(f"dataset imagefolder: cannot read image {p}: {e}") from None
                skipped.append(f"{p}: {e}")
                continue
            images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
            labels.append(label)
            counts[label] += 1
    if skipped:
        log.warning(
            "dataset imagefolder: skipped %d unreadable of %d images in %s "
            "(dataset.skip_corrupt=true); the first: %s",
            len(skipped),
            len(skipped) + len(images),
            folder,
            skipped[0],
        )
    exts = " ".join(sorted(_IMAGE_SUFFIXES))
    refuse_empty_classes("imagefolder", folder, classes, counts, exts)
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))


@register_dataset
def load_imagefolder(
    root: Path, download: bool = False, image_size: int = 32, skip_corrupt: bool = False
) -> DataSet:
    """A user's own images: root/train/<class>/*.png and root/test/<class>/*.png (or val/)."""
    train_dir, test_dir, classes = image_folder_layout("imagefolder", root, ("test", "val"))
    train = _read_folder(train_dir, classes, image_size, bool(skip_corrupt))
    test = _read_folder(test_dir, classes, image_size, bool(skip_corrupt))
    x = train.images.float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DataSet("imagefolder", train, test, classes, mean=mean, std=std)


# ---------------------------------------------------------------- synthetic
@register_dataset
def load_synthetic(
    root: Path,
    download: bool = False,
    num_train: int = 512,
    num_test: int = 256,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
    seed: int = 1234,
) -> DataSet:
    """A small learnable data set: each class is a smooth random pattern plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num_classes, channels, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(low, size=image_size, mode="bilinear")

    def make(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        noise = torch.randn(n, channels, image_size, image_size, generator=g) * 0.15
        x = (protos[labels] + noise).clamp(0, 1)
        return Split((x * 255).round().to(torch.uint8), labels)

    return DataSet(
        "synthetic",
        make(num_train),
        make(num_test),
        [f"class{i}" for i in range(num_classes)],
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
