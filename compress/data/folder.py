"""Image folders streamed from disk: data sets of any size (ImageNet) beside the in-memory path.

`datasets.py` holds a whole data set as one uint8 tensor, which ImageNet (1.28 M images,
~140 GB decoded at 224 px) cannot afford. Here images stay files: DataLoader workers decode,
crop and flip them into uint8 batches (4x less traffic than float), and the main process moves
each batch to the device and normalizes it there, as `TensorLoader` does. `FolderLoader` has
`TensorLoader`'s interface (`len`, `set_epoch`, `device`, iteration yields normalized float
(x, y) on the device), so the training loop consumes either.

Layout (torchvision's ImageFolder): ROOT/train/<class>/*.jpg and ROOT/val/<class>/ (or test/).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data import default_collate as torch_collate

from compress.data.checks import (
    UNREADABLE,
    image_folder_layout,
    refuse_empty_classes,
    require_root,
    subset_size,
)
from compress.data.registry import register_dataset
from compress.errors import ConfigError, DataError, check

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STREAMED = ("imagefolder", "imagenet")  # the data sets `dataset.streaming=true` applies to
STREAMING_KEYS = ("resize", "workers")  # config keys only the streaming path reads


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def _transform(train: bool, size: int, resize: int):
    from torchvision.transforms import v2

    if train:
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(resize, antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*geometry, v2.ToImage(), v2.ToDtype(torch.uint8)])


class FolderSplit(Dataset):
    """One split of an image folder: `len()`, `labels`, and transformed uint8 (C, H, W) samples.

    Wraps a torchvision ImageFolder, or a `Subset` of one; reading happens only when indexed.
    An unreadable image is a DataError naming the file, or with `skip_corrupt` a sample
    `(None, "PATH: reason")` that the loader drops and counts.
    """

    def __init__(
        self, data: Any, train: bool, name: str = "imagefolder", skip_corrupt: bool = False
    ) -> None:
        self.data, self.train, self.name, self.skip_corrupt = data, train, name, skip_corrupt

    @property
    def folder(self) -> Any:
        """The underlying ImageFolder (under any Subset)."""
        return self.data.dataset if isinstance(self.data, Subset) else self.data

    def _base_index(self, i: int) -> int:
        return int(self.data.indices[i]) if isinstance(self.data, Subset) else i

    @property
    def labels(self) -> torch.Tensor:
        """int64 labels of every sample, without reading an image."""
        targets = torch.as_tensor(self.folder.targets, dtype=torch.int64)
        if isinstance(self.data, Subset):
            return targets[torch.as_tensor(self.data.indices, dtype=torch.int64)]
        return targets

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, n: int | None, seed: int) -> FolderSplit:
        """A seeded random subset of `n` samples (all of them when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        base = [self._base_index(int(i)) for i in idx]
        return FolderSplit(Subset(self.folder, base), self.train, self.name, self.skip_corrupt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int | str]:
        try:
            x, y = self.data[i]
        except UNREADABLE as e:
            path = self.folder.samples[self._base_index(i)][0]
            if self.skip_corrupt:
                return None, f"{path}: {e}"
            raise DataError(f"dataset {self.name}: cannot read image {path}: {e}") from None
        return x.as_subclass(torch.Tensor), y


def collate_readable(
    samples: list[tuple[torch.Tensor | None, Any]],
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """A batch of the readable samples, and the "PATH: reason" of those skipped (`skip_corrupt`);
    (None, None, skipped) when none of them could be read."""
    good = [s for s in samples if s[0] is not None]
    skipped = [s[1] for s in samples if s[0] is None]
    if not good:
        return None, None, skipped
    x, y = torch_collate(good)
    return x, y, skipped


class SeededSamples(Dataset):
    """Samples of a training split whose augmentation is seeded by (seed, epoch, index).

    So the augmentation of epoch k is the same whatever the number of workers, and a resumed
    run sees the same images; the global RNG of the process is left as it was.
    """

    def __init__(self, split: Dataset, base_seed: int) -> None:
        self.split, self.base_seed = split, base_seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.base_seed * 0x9E3779B97F4A7C15 + i) % 2**63)
            return self.split[i]


def leave_stop_signals(worker_id: int) -> None:
    """DataLoader workers' init: leave the signals that stop a run (SIGTERM, SIGUSR1, SIGUSR2)
    to the main process, which saves the run at the next step (compress.engine.StopSignals).

    SLURM signals every process of a job before it preempts it, and torch's workers die of a
    SIGTERM that is not their parent's: the main process would then fail at its next batch
    ("DataLoader worker exited unexpectedly") before anything is saved. So SIGUSR1 / SIGUSR2 are
    ignored, and SIGTERM is blocked and taken by a thread that ends the worker only when it
    comes from the main process (multiprocessing's terminate() at exit), as torch's does."""
    for name in ("SIGUSR1", "SIGUSR2"):
        sig = getattr(signal, name, None)  # POSIX only
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere SIGTERM stays torch's
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        parent = os.getppid()
        threading.Thread(target=_sigterm_from_parent_only, args=(parent,), daemon=True).start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class EpochSampler(Sampler[int]):
    """Sample indices of one epoch: a permutation seeded by (seed, epoch) when shuffling, and
    this rank's disjoint slice of it (`order[rank::world]`) when sharded."""

    def __init__(
        self, n: int, shuffle: bool, seed: int, epoch: int, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.n, self.shuffle, self.seed, self.epoch, self.shard = n, shuffle, seed, epoch, shard

    def indices(self) -> torch.Tensor:
        rank, world = self.shard
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            # every rank takes the same number of samples, so sharded ranks step in lockstep
            return torch.randperm(self.n, generator=g)[rank::world][: self.n // world]
        return torch.arange(self.n)[rank::world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        rank, world = self.shard
        return self.n // world if self.shuffle else len(range(rank, self.n, world))


class FolderLoader:
    """Iterate (images, labels) batches of a `FolderSplit`: normalized floats on `device`.

    `TensorLoader`'s interface. Workers (a fresh DataLoader each epoch, not persistent) decode
    and augment into uint8 batches; normalization runs on the device. The order of epoch k
    depends only on (seed, k). `shard=(rank, world_size)` reads a disjoint 1/world_size slice.
    """

    def __init__(
        self,
        split: FolderSplit,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        train: bool = False,
        seed: int = 0,
        workers: int | None = None,
        channels_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        check(batch_size >= 1, "batch_size", batch_size, "a positive integer")
        workers = default_workers() if workers is None else workers
        check(workers >= 0, "dataset.workers", workers, "an integer >= 0 or null")
        shard = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
        check(
            shard[1] >= 1 and 0 <= shard[0] < shard[1],
            "shard",
            shard,
            "(rank, world_size) with 0 <= rank < world_size",
        )
        self.device = torch.device(device)
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.workers, self.channels_last, self.shard = workers, channels_last, shard
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its batch `start` on (a run resumed inside the epoch): the
        samples of the batches before it are not read. The rest are the batches of the whole
        epoch: the order is the epoch's and each sample's augmentation is seeded by its index."""
        self.epoch, self.start = epoch, start

    def sampler(self) -> EpochSampler:
        return EpochSampler(len(self.split), self.train, self.seed, self.epoch, self.shard)

    def __len__(self) -> int:
        n, b = len(self.sampler()), self.batch_size
        # as TensorLoader: drop the last partial batch in training, unless it is the only one
        return n // b if self.train and n >= b else -(-n // b)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalized float; the layout changes on uint8 (4x fewer bytes to move)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.float().sub_(self.mean).div_(self.std)  # float() keeps the memory format

    def dataloader(self) -> DataLoader:
        """The epoch's torch DataLoader of uint8 (x, y) batches on the host."""
        base_seed = self.seed * 100003 + self.epoch
        sampler = self.sampler()
        data = SeededSamples(self.split, base_seed) if self.train else self.split
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler.indices()[self.start * self.batch_size :].tolist()
            if self.start
            else sampler,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=self.train and len(sampler) >= self.batch_size,
            persistent_workers=False,
            collate_fn=collate_readable if self.split.skip_corrupt else None,
            worker_init_fn=leave_stop_signals,
            # worker seeds from here, not from (and advancing) the global RNG
            generator=torch.Generator().manual_seed(base_seed),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skipped: list[str] = []
        try:
            for batch in self.dataloader():
                x, y = batch[:2]
                if self.split.skip_corrupt:
                    skipped += batch[2]
                    if x is None:  # every image of the batch unreadable
                        continue
                x = x.to(self.device, non_blocking=True)
                yield self.normalize(x), y.to(self.device, non_blocking=True)
        except DataError as e:  # from a worker, the message holds its traceback: keep our line
            last = str(e).strip().splitlines()[-1]
            raise DataError(last.split("DataError: ", 1)[-1]) from None
        finally:  # also when the reader stops early (calibration reads a few batches)
            self._log_skipped(skipped)

    def _log_skipped(self, skipped: list[str]) -> None:
        if skipped:
            log.warning(
                "dataset %s: skipped %d unreadable of %d %s images in this pass "
                "(dataset.skip_corrupt=true); the first: %s",
                self.split.name,
                len(skipped),
                len(self.sampler()),
                "training" if self.train else "test",
                skipped[0],
            )


@dataclass
class FolderDataSet:
    """An image folder read from disk batch by batch; `DataSet`'s attributes, plus `loaders`."""

    name: str
    train: FolderSplit
    test: FolderSplit
    classes: list[str]
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    workers: int | None = None

    in_channels = 3

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one test image: the input shape for MACs and latency."""
        return (3, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loaders(
        self,
        batch_size: int,
        eval_batch_size: int,
        device: torch.device | str,
        seed: int,
        channels_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> tuple[FolderLoader, FolderLoader]:
        """(train, test) loaders: what the engine asks any data set for."""
        common = dict(device=device, workers=self.workers, channels_last=channels_last, shard=shard)
        train = FolderLoader(
            self.train, batch_size, self.mean, self.std, train=True, seed=seed, **common
        )
        test = FolderLoader(self.test, eval_batch_size, self.mean, self.std, **common)
        return train, test


def _image_folder(name: str, folder: Path, classes: list[str], transform: Any) -> Any:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    ds = ImageFolder(str(folder), transform=transform, allow_empty=True)
    counts = torch.bincount(torch.as_tensor(ds.targets, dtype=torch.int64), minlength=len(classes))
    refuse_empty_classes(name, folder, classes, counts.tolist(), " ".join(IMG_EXTENSIONS))
    return ds


def load_image_folder_stream(
    root: str | Path,
    image_size: int = 224,
    resize: int | None = None,
    workers: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    name: str = "imagefolder",
    skip_corrupt: bool = False,
) -> FolderDataSet:
    """Index ROOT/train/<class>/ and ROOT/val/<class>/ (or test/) without reading any image.

    Training: RandomResizedCrop(image_size) + flip. Test: Resize(resize) + CenterCrop, where
    resize defaults to image_size / 0.875 (256 for 224, the usual ImageNet protocol).
    An unreadable image stops the run with a line naming it when it is read, or with
    `skip_corrupt` is left out of its batch and counted in the log each pass.
    """
    root = Path(root)
    check(int(image_size) >= 1, "dataset.image_size", image_size, "a positive integer")
    image_size = int(image_size)
    resize = int(image_size / 0.875) if resize is None else int(resize)
    check(
        resize >= image_size,
        "dataset.resize",
        resize,
        f"null or an integer >= dataset.image_size={image_size}",
    )
    for key, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        check(n is None or n >= 1, f"dataset.{key}", n, "a positive integer or null")
    require_root(name, root)
    train_dir, test_dir, classes = image_folder_layout(name, root, ("val", "test"))
    skip = bool(skip_corrupt)
    train_set = _image_folder(name, train_dir, classes, _transform(True, image_size, resize))
    test_set = _image_folder(name, test_dir, classes, _transform(False, image_size, resize))
    train = FolderSplit(train_set, True, name, skip)
    test = FolderSplit(test_set, False, name, skip)
    train_subset = subset_size("train_subset", train_subset, len(train), "training")
    test_subset = subset_size("test_subset", test_subset, len(test), "test")
    return FolderDataSet(
        name,
        train.subset(train_subset, seed),
        test.subset(test_subset, seed + 1),
        classes,
        image_size,
        workers=workers,
    )


@register_dataset
def load_imagenet(
    root: Path,
    download: bool = False,
    image_size: int = 224,
    resize: int | None = None,
    workers: int | None = None,
    skip_corrupt: bool = False,
) -> FolderDataSet:
    """ImageNet (ILSVRC-2012) in torchvision's ImageFolder layout, streamed from disk."""
    _no_download("imagenet", download)
    return load_image_folder_stream(
        root, image_size, resize, workers, name="imagenet", skip_corrupt=skip_corrupt
    )


def _no_download(name: str, download: bool) -> None:
    if download:
        raise ConfigError(
            f"dataset.download=true is invalid for {name}: its images cannot be "
            "fetched automatically; put them in ROOT/train/<class>/ and "
            "ROOT/val/<class>/"
        )


def load_streaming(
    name: str,
    root: Path,
    download: bool,
    train_subset: int | None,
    test_subset: int | None,
    seed: int,
    kwargs: dict[str, Any],
) -> FolderDataSet | None:
    """`dataset.streaming`: a FolderDataSet when true; None (the in-memory path) when false.

    Pops `streaming` and the streaming-only keys from `kwargs`, so the in-memory loader does
    not see them.
    """
    streaming = kwargs.pop("streaming")
    extra = {k: kwargs.pop(k) for k in STREAMING_KEYS if k in kwargs}
    if not streaming:
        check(
            name != "imagenet",
            "dataset.streaming",
            streaming,
            "true for imagenet (too large to hold in memory)",
        )
        given = [k for k, v in extra.items() if v is not None]
        if given:
            raise ConfigError(
                f"dataset.{given[0]}={extra[given[0]]!r} only applies with dataset.streaming=true"
            )
        return None
    check(
        name in STREAMED,
        "dataset.streaming",
        streaming,
        f"false for {name}: only image folders ({', '.join(STREAMED)}) stream from disk",
    )
    _no_download(name, download)
    return load_image_folder_stream(
        root,
        train_subset=train_subset,
        test_subset=test_subset,
        seed=seed,
        name=name,
        **kwargs,
        **extra,
    )
