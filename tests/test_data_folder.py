"""The streaming image-folder data set (compress/data/folder.py) on a tiny generated folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from compress.data import (
    DataSet,
    FolderDataSet,
    FolderLoader,
    load_dataset,
    load_image_folder_stream,
)
from compress.errors import ConfigError, DataError

CLASSES = ("ant", "bee", "cat")
CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def write_folder(root: Path, train: int = 6, val: int = 3, seed: int = 0) -> Path:
    """CLASSES x (train, val) images of random sizes, JPEG and PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(30, 60, size=2)
                img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img[..., c] = 255  # the class colour, so labels and pixels can be told apart
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(img).save(root / split / cls / f"{i}.{ext}")
    return root


from compress.tasks.common import load_data  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


def test_data_set_attributes_batches_and_normalization(root):
    ds = load_image_folder_stream(root, image_size=24, workers=0)
    assert isinstance(ds, FolderDataSet) and ds.classes == list(CLASSES)
    assert (ds.num_classes, ds.in_channels, ds.image_shape) == (3, 3, (3, 24, 24))
    assert (len(ds.train), len(ds.test)) == (18, 9)
    assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)
    train, test = ds.loaders(4, 4, "cpu", seed=0, channels_last=True)
    assert (len(train), len(test)) == (4, 3)  # 18 // 4 (drop_last), ceil(9 / 4)
    batches = list(train)
    assert len(batches) == 4 and {tuple(x.shape) for x, _ in batches} == {(4, 3, 24, 24)}
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last)
    raw, raw_y = next(iter(train.dataloader()))  # the same epoch's uint8 batch, from workers
    assert raw.dtype == torch.uint8 and torch.equal(raw_y, y)
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(x, (raw.float() / 255 - mean) / std, atol=1e-5)
    assert set(torch.cat([y for _, y in batches]).tolist()) == {0, 1, 2}
    test_batches = list(test)
    assert [len(y) for _, y in test_batches] == [4, 4, 1]
    assert torch.equal(torch.cat([y for _, y in test_batches]), ds.test.labels)
    assert torch.equal(ds.test.labels, torch.tensor([0] * 3 + [1] * 3 + [2] * 3))
    # the class colour survives crop, flip and normalization: channel c is brightest
    assert (x.mean(dim=(2, 3)).argmax(1) == y).all()


def test_order_and_augmentation_depend_only_on_seed_and_epoch(root):
    ds = load_image_folder_stream(root, image_size=16)
    a = FolderLoader(ds.train, 6, ds.mean, ds.std, train=True, seed=3, workers=0)
    b = FolderLoader(ds.train, 6, ds.mean, ds.std, train=True, seed=3, workers=2)
    first = list(a)
    again = list(b)  # other workers, same (seed, epoch): same order, same crops and flips
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    order0 = a.sampler().indices()
    a.set_epoch(1)
    assert not torch.equal(a.sampler().indices(), order0)
    a.set_epoch(0)
    assert torch.equal(a.sampler().indices(), order0)
    other_seed = FolderLoader(ds.train, 6, ds.mean, ds.std, train=True, seed=4, workers=0)
    assert not torch.equal(other_seed.sampler().indices(), order0)


def test_shards_are_disjoint_and_cover(root):
    ds = load_image_folder_stream(root, image_size=16, workers=0)
    world = 4
    trains = [
        ds.loaders(2, 2, "cpu", 0, shard=(r, world))[0].sampler().indices() for r in range(world)
    ]
    assert {len(t) for t in trains} == {18 // world}  # ranks step in lockstep
    seen = torch.cat(trains)
    assert len(set(seen.tolist())) == len(seen)  # disjoint
    tests = [ds.loaders(2, 2, "cpu", 0, shard=(r, world))[1] for r in range(world)]
    assert sorted(torch.cat([t.sampler().indices() for t in tests]).tolist()) == list(range(9))
    labels = torch.cat([y for t in tests for _, y in t])  # read through the loaders
    assert sorted(labels.tolist()) == sorted(ds.test.labels.tolist())
    with pytest.raises(ConfigError, match="shard="):
        FolderLoader(ds.test, 2, ds.mean, ds.std, shard=(2, 2))


def test_subsets_are_seeded(root):
    ds = load_image_folder_stream(root, image_size=16, train_subset=5, test_subset=4, seed=1)
    again = load_image_folder_stream(root, image_size=16, train_subset=5, test_subset=4, seed=1)
    assert (len(ds.train), len(ds.test)) == (5, 4)
    assert torch.equal(ds.train.labels, again.train.labels)
    x, y = next(iter(ds.loaders(5, 4, "cpu", 0)[0]))
    assert x.shape == (5, 3, 16, 16) and sorted(y.tolist()) == sorted(ds.train.labels.tolist())
    whole = load_image_folder_stream(root, train_subset=100)
    assert len(whole.train) == 18


def test_registry_and_configs(root):
    ds = load_dataset("imagenet", root=root, image_size=16, train_subset=7, workers=0)
    assert ds.name == "imagenet" and len(ds.train) == 7 and ds.image_shape == (3, 16, 16)
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "imagenet.yaml"))
    assert cfg["streaming"] and cfg["image_size"] == 224 and cfg["resize"] is None
    net = load_data({**cfg, "root": str(root), "test_subset": 2, "workers": 0}, seed=0)
    assert isinstance(net, FolderDataSet) and len(net.test) == 2
    assert next(iter(net.loaders(2, 2, "cpu", 0)[1]))[0].shape == (2, 3, 224, 224)
    folder = OmegaConf.to_container(OmegaConf.load(CONF / "imagefolder.yaml"))
    folder["root"] = str(root)
    memory = load_data(folder, seed=0)  # streaming: false keeps the in-memory path
    assert isinstance(memory, DataSet) and memory.train.images.shape == (18, 3, 32, 32)
    streamed = load_data({**folder, "streaming": True, "workers": 0}, seed=0)
    assert isinstance(streamed, FolderDataSet) and streamed.name == "imagefolder"
    with pytest.raises(ConfigError, match="dataset.workers=2 only applies with"):
        load_data({**folder, "workers": 2}, seed=0)
    with pytest.raises(ConfigError, match="dataset.streaming=True is invalid: expected false"):
        load_dataset("synthetic", streaming=True)
    with pytest.raises(ConfigError, match="dataset.streaming=False is invalid"):
        load_dataset("imagenet", root=root, streaming=False)
    with pytest.raises(ConfigError, match="dataset.resize=8 is invalid"):
        load_image_folder_stream(root, image_size=16, resize=8)


def test_bad_folders_are_one_line_data_errors(tmp_path):
    def fails(path: Path, match: str) -> None:
        with pytest.raises(DataError, match=match) as info:
            load_dataset("imagenet", root=path)
        assert "\n" not in str(info.value)

    fails(tmp_path / "nowhere", r"nowhere not found; set dataset.root")
    (tmp_path / "a" / "val" / "x").mkdir(parents=True)
    fails(tmp_path / "a", r"no train/ folder in .*expected .*/train/<class>/")
    (tmp_path / "b" / "train" / "x").mkdir(parents=True)
    fails(tmp_path / "b", r"no val/ \(or test/\) folder")
    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "c" / "test" / "x").mkdir(parents=True)
    fails(tmp_path / "c", r"no images under .*c/train/<class>/ \(no class folders")
    (tmp_path / "c" / "train" / "x").mkdir()
    (tmp_path / "c" / "train" / "x" / "notes.txt").write_text("not an image")
    fails(tmp_path / "c", r"no images under .*c/train/<class>/ \(looked for \.jpg")
    write_folder(tmp_path / "d", train=1, val=1)
    (tmp_path / "d" / "train" / "dog").mkdir()
    (tmp_path / "d" / "val" / "dog").mkdir()
    fails(tmp_path / "d", r"class folder .*train/dog has no images")
    write_folder(tmp_path / "e", train=1, val=1)
    (tmp_path / "e" / "train" / "dog").mkdir()
    fails(tmp_path / "e", r"labels would not match: class dog in train/ but not in val/")
    write_folder(tmp_path / "f", train=1, val=1)
    (tmp_path / "f" / "val" / "dog").mkdir()
    fails(tmp_path / "f", r"labels would not match: class dog in val/ but not in train/")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_a_one_line_data_error(tmp_path, workers):
    root = write_folder(tmp_path, train=2, val=1)
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    ds = load_image_folder_stream(root, image_size=16, workers=workers)
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg") as info:
        list(ds.loaders(7, 3, "cpu", 0)[0])
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_training_pruning_and_fusion_stream_an_image_folder(entry, root, tmp_path):
    """dataset=imagenet on an ImageNet-layout folder, through train, prune and fuse."""
    data = (
        "dataset=imagenet",
        f"dataset.root={root}",
        "dataset.image_size=32",
        "dataset.workers=0",
    )
    run = (
        "model=resnet20",
        "schedule.epochs=1",
        "schedule.batch_size=6",
        "schedule.progress=false",
    )
    code, out, err = entry("train", *data, *run, "device=cpu", run_dir=tmp_path / "t")
    assert code == 0, err
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["dataset"] == "imagenet" and metrics["epochs"] == 1
    code, _, err = entry(
        "prune", f"ckpt={tmp_path}/t/best.pt", "pruner.min_channels=1", run_dir=tmp_path / "p"
    )
    assert code == 0, err
    code, out, err = entry("fuse", f"ckpt={tmp_path}/p/pruned.pt", run_dir=tmp_path / "f")
    assert code == 0 and "over 9 test images" in out, err
