"""Faults in the data (compress/data/): every unreadable file, empty class, missing file or key
and oversized subset is one line that names it, or with `dataset.skip_corrupt=true` a skipped
image counted in the log; in the library and through the train entry point."""

from __future__ import annotations

import gzip
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

from compress.data import FolderDataSet, load_dataset, load_image_folder_stream
from compress.data.datasets import CIFAR10_FILES
from compress.errors import ConfigError, DataError
from tests.test_data_folder import write_folder

SMALL = (  # a tiny model and one short epoch: the entry runs fail (or pass) in seconds
    "model=resnet20",
    "model.channels=[4,4,4,4,4,4,4,4,4]",
    "schedule.epochs=1",
    "schedule.batch_size=4",
    "schedule.progress=false",
    "device=cpu",
)


def jpeg_bytes(seed: int = 0) -> bytes:
    from PIL import Image

    img = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG")
    return buf.getvalue()


def image_folder(root: Path, test: str = "test", train: int = 2, val: int = 1) -> Path:
    """write_folder's classes, with the test split named `test` (the in-memory default) or val."""
    write_folder(root, train=train, val=val)
    if test != "val":
        (root / "val").rename(root / test)
    return root


def break_image(root: Path, how: str) -> Path:
    """A corrupt (JPEG header, then garbage) or truncated (half a real JPEG) train image."""
    path = root / "train" / "bee" / f"{how}.jpg"
    raw = jpeg_bytes()
    path.write_bytes(b"\xff\xd8\xff not a jpeg" if how == "corrupt" else raw[: len(raw) // 2])
    return path


def one_line_error(code: int, err: str, *fragments: str) -> str:
    """The entry's output on a data fault: exit 2 and exactly one line, `error: ...`."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- unreadable images
@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_unreadable_image_in_memory_is_one_line_naming_it(tmp_path, how):
    root = image_folder(tmp_path)
    bad = break_image(root, how)
    with pytest.raises(DataError, match=rf"dataset imagefolder: cannot read image {bad}: ") as e:
        load_dataset("imagefolder", root=root, image_size=8)
    assert "\n" not in str(e.value)
    if how == "truncated":
        assert "truncated" in str(e.value)


def test_truncated_image_streamed_is_one_line_naming_it(tmp_path):
    root = image_folder(tmp_path, test="val")
    bad = break_image(root, "truncated")
    ds = load_image_folder_stream(root, image_size=8, workers=0)
    with pytest.raises(DataError, match=rf"cannot read image {bad}: image file is truncated"):
        list(ds.loaders(3, 3, "cpu", 0)[0])


def test_skip_corrupt_in_memory_leaves_them_out_and_counts_them(tmp_path, caplog):
    root = image_folder(tmp_path)
    bad = break_image(root, "corrupt")
    break_image(root, "truncated")
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        ds = load_dataset("imagefolder", root=root, image_size=8, skip_corrupt=True)
    assert len(ds.train) == 6 and len(ds.test) == 3  # 3 classes x 2 readable train images
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith(f"dataset imagefolder: skipped 2 unreadable of 8 images in {root}")
    assert "(dataset.skip_corrupt=true); the first: " + str(bad) in warned[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_streamed_drops_them_from_batches_and_counts_them(tmp_path, caplog, workers):
    root = image_folder(tmp_path, test="val")
    bad = break_image(root, "corrupt")
    ds = load_image_folder_stream(root, image_size=8, workers=workers, skip_corrupt=True)
    assert len(ds.train) == 7  # indexed, not read: the broken file is found when it is read
    train, test = ds.loaders(1, 3, "cpu", 0)  # batches of one: the broken one is a whole batch
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        labels = [y for _, y in train]
    assert sum(len(y) for y in labels) == 6
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        "dataset imagefolder: skipped 1 unreadable of 7 training images in this pass "
        f"(dataset.skip_corrupt=true); the first: {bad}: cannot identify image file"
    )
    assert sum(len(y) for _, y in test) == 3  # the test split is unaffected
    sub = load_image_folder_stream(root, image_size=8, train_subset=7, skip_corrupt=True)
    assert sub.train.skip_corrupt  # kept through a subset


# ---------------------------------------------------------------- empty classes, layout
@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_class_is_refused_in_memory(tmp_path, split):
    root = image_folder(tmp_path)
    (root / "train" / "dog").mkdir()
    (root / "test" / "dog").mkdir()
    (root / ("test" if split == "train" else "train") / "dog" / "0.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(DataError, match=rf"class folder .*{split}/dog has no images \(1 empty"):
        load_dataset("imagefolder", root=root, image_size=8)


def test_a_class_left_empty_by_skipped_images_is_refused(tmp_path):
    root = image_folder(tmp_path, train=1)
    (root / "train" / "bee" / "0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"class folder .*train/bee has no images"):
        load_dataset("imagefolder", root=root, image_size=8, skip_corrupt=True)


def test_in_memory_folder_layout_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"nowhere not found; set dataset.root"):
        load_dataset("imagefolder", root=tmp_path / "nowhere")
    root = image_folder(tmp_path / "a")
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "0.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(DataError, match=r"labels would not match: class dog in train/ but not"):
        load_dataset("imagefolder", root=root)  # was a FileNotFoundError traceback
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no test/ \(or val/\) folder in .*b: expected"):
        load_dataset("imagefolder", root=tmp_path / "b")


def test_missing_root_names_the_key():
    for name in ("imagefolder", "imagenet"):
        with pytest.raises(ConfigError, match=rf"^dataset.root is not set: dataset={name} needs"):
            load_dataset(name, root="???")


# ---------------------------------------------------------------- CIFAR / MNIST files
def write_cifar(root: Path, n: int = 4) -> Path:
    """CIFAR-10's python layout with n random images per batch (pickled dicts, as released)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CIFAR10_FILES:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
            "batch_label": name,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


class _Runs:
    """A pickle that would call a function when loaded (here the harmless `print`)."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_cifar_missing_or_foreign_file_is_named(tmp_path, capsys):
    folder = write_cifar(tmp_path)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train.images.shape == (20, 3, 32, 32) and len(ds.test) == 4
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_3 \(1 of data_b"):
        load_dataset("cifar10", root=tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _Runs()}, protocol=2))
    with pytest.raises(
        DataError, match=r"cannot read .*data_batch_3: it refers to \w+\.print, which"
    ):
        load_dataset("cifar10", root=tmp_path)
    assert "must never run" not in capsys.readouterr().out
    with pytest.raises(DataError, match=r"cifar-10-batches-py not found; set dataset.root"):
        load_dataset("cifar10", root=tmp_path / "elsewhere")


def test_mnist_missing_file_is_named(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for stem, shape in (
        ("train-images-idx3-ubyte", (4, 28, 28)),
        ("train-labels-idx1-ubyte", (4,)),
        ("t10k-images-idx3-ubyte", (2, 28, 28)),
    ):
        head = bytes([0, 0, 8, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
        (folder / f"{stem}.gz").write_bytes(gzip.compress(head + bytes(int(np.prod(shape)))))
    with pytest.raises(DataError, match=r"MNIST/raw lacks t10k-labels-idx1-ubyte\(\.gz\) \(1 of"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DataError, match=r"dataset mnist: .*MNIST/raw not found"):
        load_dataset("mnist", root=tmp_path / "elsewhere")


# ---------------------------------------------------------------- subsets larger than the data
def test_oversized_subsets_are_clamped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        ds = load_dataset("synthetic", num_train=20, num_test=10, train_subset=50, test_subset=10)
    assert (len(ds.train), len(ds.test)) == (20, 10)  # test_subset = its size: no warning
    assert [r.getMessage() for r in caplog.records] == [
        "dataset.train_subset=50 is more than the 20 training images: using all 20"
    ]
    caplog.clear()
    root = image_folder(tmp_path, test="val")
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        streamed = load_image_folder_stream(root, image_size=8, test_subset=4)
    assert isinstance(streamed, FolderDataSet) and len(streamed.test) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "dataset.test_subset=4 is more than the 3 test images: using all 3"
    ]


# ---------------------------------------------------------------- through the entry point
def test_entry_data_faults_are_one_line_and_exit_2(entry, tmp_path):
    code, _, err = entry("train", "dataset=imagefolder", *SMALL, run_dir=tmp_path / "r0")
    one_line_error(code, err, "error: dataset.root is not set", "dataset.root=PATH")

    root = image_folder(tmp_path / "folder")
    bad = break_image(root, "truncated")
    data = ("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8")
    code, _, err = entry("train", *data, *SMALL, run_dir=tmp_path / "r1")
    one_line_error(code, err, f"cannot read image {bad}")
    streamed = (*data, "dataset.streaming=true", "dataset.workers=0")
    code, _, err = entry("train", *streamed, *SMALL, run_dir=tmp_path / "r2")
    one_line_error(code, err, f"cannot read image {bad}")

    bad.unlink()
    (root / "train" / "dog").mkdir()
    (root / "test" / "dog").mkdir()
    code, _, err = entry("train", *data, *SMALL, run_dir=tmp_path / "r3")
    one_line_error(code, err, f"class folder {root}/train/dog has no images")

    write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch").unlink()
    cifar = ("dataset=cifar10", f"dataset.root={tmp_path}/cifar")
    code, _, err = entry("train", *cifar, *SMALL, run_dir=tmp_path / "r4")
    one_line_error(code, err, "cifar-10-batches-py lacks test_batch")


def test_entry_trains_past_skipped_images(entry, tmp_path, caplog):
    root = image_folder(tmp_path / "folder", train=3)
    break_image(root, "corrupt")
    data = ("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=8")
    with caplog.at_level(logging.WARNING, logger="compress.data"):
        code, out, err = entry(
            "train", *data, "dataset.skip_corrupt=true", *SMALL, run_dir=tmp_path / "r"
        )
    assert code == 0 and "test accuracy:" in out, err
    assert any("skipped 1 unreadable of 10 images" in r.getMessage() for r in caplog.records)
