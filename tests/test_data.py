from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import pytest
import torch

from compress.data import Split, TensorLoader, load_dataset, random_crop_flip
from compress.data.datasets import CIFAR10_FILES, read_idx
from compress.errors import ConfigError, DataError


def test_synthetic_is_seeded_uint8_and_balanced():
    a = load_dataset("synthetic", num_train=100, num_test=50)
    b = load_dataset("synthetic", num_train=100, num_test=50)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (100, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert torch.bincount(a.train.labels).tolist() == [10] * 10
    assert a.num_classes == 10 and a.in_channels == 3


def test_synthetic_is_learnable_by_nearest_class_mean():
    ds = load_dataset("synthetic")
    x, y = ds.train.images.float().flatten(1), ds.train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    pred = torch.cdist(ds.test.images.float().flatten(1), means).argmin(1)
    assert (pred == ds.test.labels).float().mean() > 0.9


def test_subsets_are_seeded_and_sized():
    ds = load_dataset("synthetic", train_subset=40, test_subset=20, seed=3)
    again = load_dataset("synthetic", train_subset=40, test_subset=20, seed=3)
    assert len(ds.train) == 40 and len(ds.test) == 20
    assert torch.equal(ds.train.labels, again.train.labels)


def test_unknown_dataset_and_bad_subset_are_clear_errors():
    with pytest.raises(ConfigError, match="dataset.name='nope' is invalid: expected one of"):
        load_dataset("nope")
    with pytest.raises(ConfigError, match="dataset.train_subset=0"):
        load_dataset("synthetic", train_subset=0)


def test_random_crop_is_a_shift_of_the_padded_image_and_flip_mirrors():
    x = torch.arange(1, 2 * 8 * 8 + 1, dtype=torch.int32).view(2, 1, 8, 8).to(torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=False, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = random_crop_flip(
        x.repeat(64, 1, 1, 1), padding=0, flip=True, generator=torch.Generator().manual_seed(0)
    )
    n_flipped = sum(torch.equal(f, x[0].flip(2)) for f in flipped[::2])
    assert 20 < n_flipped < 44  # about half of 64


def test_loader_normalizes_batches_and_orders_by_epoch_seed():
    split = Split(torch.full((10, 3, 4, 4), 255, dtype=torch.uint8), torch.arange(10))
    loader = TensorLoader(split, 4, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, seed=1)
    batches = list(loader)
    assert len(batches) == 2 and batches[0][0].shape == (4, 3, 4, 4)  # drop_last in training
    assert torch.allclose(batches[0][0], torch.full((4, 3, 4, 4), 2.0))  # (1 - .5) / .25
    again = [y for _, y in loader]
    assert all(torch.equal(a, b[1]) for a, b in zip(again, batches, strict=True))
    loader.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in loader]), torch.cat(again))
    test = TensorLoader(split, 4, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert [len(y) for _, y in test] == [4, 4, 2]


def _mirrored(loader: TensorLoader, epochs: int) -> dict[tuple[int, int], bool]:
    """(epoch, image) -> whether the image came mirrored (its label is its index; the images
    are 1 x 2 pixels, the left one lit)."""
    seen: dict[tuple[int, int], bool] = {}
    for e in range(epochs):
        loader.set_epoch(e)
        for x, y in loader:
            for xi, yi in zip(x, y, strict=True):
                seen[e, int(yi)] = bool(xi[0, 0, 1] > xi[0, 0, 0])
    return seen


def test_alternate_flips_mirror_each_image_every_other_epoch_from_a_seeded_coin():
    """dataset.flip=alternate (airbench's derandomized flips): each image is mirrored on
    every other epoch, about half of them from epoch 0, the same on any world size; random
    flips repeat an image's orientation in consecutive epochs about half the time."""
    n = 64
    images = torch.zeros(n, 1, 1, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = 255
    split = Split(images, torch.arange(n))

    def loader(flip, **kw):
        return TensorLoader(split, 8, (0.0,), (1.0,), train=True, flip=flip, seed=1, **kw)

    alt = _mirrored(loader("alternate"), 4)
    assert len(alt) == 4 * n
    assert all(alt[e, i] != alt[e + 1, i] for e in range(3) for i in range(n))
    assert 16 < sum(alt[0, i] for i in range(n)) < 48  # a coin per image, not one for all
    ranks = [_mirrored(loader("alternate", shard=(r, 2)), 4) for r in range(2)]
    assert {**ranks[0], **ranks[1]} == alt  # sharded: the same images mirrored the same
    rnd = _mirrored(loader(True), 4)
    repeats = sum(rnd[e, i] == rnd[e + 1, i] for e in range(3) for i in range(n))
    assert 0.3 < repeats / (3 * n) < 0.7
    assert not any(_mirrored(loader(False), 1).values())
    with pytest.raises(ConfigError, match="flip=yes is invalid: expected true, false or alt"):
        loader("yes")


def test_cifar10_missing_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py not found; set dataset.root"):
        load_dataset("cifar10", root=tmp_path)


def test_real_cifar10(cifar_root, caplog):
    ds = load_dataset("cifar10", root=cifar_root)
    assert ds.train.images.shape == (50_000, 3, 32, 32) and len(ds.test) == 10_000
    assert ds.train.images.dtype == torch.uint8
    assert torch.bincount(ds.train.labels).tolist() == [5000] * 10
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    # A copy that differs from the canonical release (the supplied one was JPEG-recompressed)
    # is accepted with exactly one warning line; a canonical copy with none.
    folder = cifar_root / "cifar-10-batches-py"
    differs = any(
        hashlib.md5((folder / f).read_bytes()).hexdigest() != md5
        for f, md5 in CIFAR10_FILES.items()
    )
    warned = sum("differ from the canonical release" in r.message for r in caplog.records)
    assert warned == int(differs)


def test_real_mnist_from_idx_gz(mnist_root):
    ds = load_dataset("mnist", root=mnist_root)
    assert ds.train.images.shape == (60_000, 1, 28, 28) and len(ds.test) == 10_000
    assert ds.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the canonical first labels


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist", root="/usr/share/datasets")
    assert ds.train.images.shape == (60_000, 1, 28, 28)
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


def test_idx_reader_and_truncated_file(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "b").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "b")


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 20), color).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset("imagefolder", root=tmp_path, image_size=16)
    assert ds.classes == ["cat", "dog"] and ds.train.images.shape == (6, 3, 16, 16)
    assert (
        ds.train.images[0, 0].float().mean() == 255
        and ds.train.labels.tolist() == [0] * 3 + [1] * 3
    )
    with pytest.raises(DataError, match="expected .*/train/<class>/"):
        load_dataset("imagefolder", root=tmp_path / "train")
