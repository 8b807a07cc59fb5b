"""Batches from uint8 tensors, with augmentation and normalization done batched on the device.

No per-image Python work: a batch is gathered, moved to the device as uint8 (4x less traffic
than float; on a GPU the whole uint8 set lives there), cropped and flipped with tensor
indexing, then converted and normalized.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from compress.data.datasets import Split
from compress.errors import ConfigError, check


FLIP_MODES = (True, False, "alternate")


def check_flip(value: object, where: str = "dataset.flip") -> bool | str:
    """`dataset.flip` as the loaders take it: true (a random horizontal flip per image and
    epoch), false, or alternate (airbench's derandomized flips: each image flipped on every
    other epoch, starting from a seeded coin per image, so an image and its mirror image are
    seen equally often)."""
    if value in ("alternate",) or isinstance(value, bool):
        return value  # type: ignore[return-value]
    raise ConfigError(f"{where}={value} is invalid: expected true, false or alternate")


def crop_flip_params(
    n: int, padding: int, flip: bool, generator: torch.Generator | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of `random_crop_flip` for n images: (dy, dx, flip mask), None where the
    augmentation is off. Drawn for a whole global batch, so sharded ranks slice the same draws."""
    dy = dx = mask = None
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
    return dy, dx, mask


def apply_crop_flip(
    x: torch.Tensor,
    padding: int,
    dy: torch.Tensor | None,
    dx: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """Crop (zero padding) and flip a (N, C, H, W) batch as the draws of `crop_flip_params` say."""
    n, _, h, w = x.shape
    if dy is not None and dx is not None:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy, dx = dy.to(x.device), dx.to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    if mask is not None:
        mask = mask.to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a (N, C, H, W) batch."""
    return apply_crop_flip(x, padding, *crop_flip_params(len(x), padding, flip, generator))


class TensorLoader:
    """Iterate (images, labels) batches of a `Split`, normalized floats on `device`.

    Shuffling and augmentation draw from a generator seeded by (seed, epoch), so epoch k is the
    same whether a run got there directly or resumed from a checkpoint, at its start or inside
    it (`set_epoch(k, start)`).

    `shard=(rank, world_size)`: this rank's disjoint part of the data (data-parallel training).
    Every rank draws the same epoch permutation and the same augmentation; global batch i is
    `order[i * world * batch : (i + 1) * world * batch]` and rank r takes its positions
    r, r + world, ... (as `FolderLoader` does). So the ranks' batches together are the batch
    (images and crops alike) a single process with batch_size = world * batch would see. In
    training every rank gets the same number of batches, (n // world) // batch_size; in
    evaluation rank r reads images r, r + world, ... (the counts may differ by one).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        train: bool = False,
        crop_padding: int = 0,
        flip: bool | str = False,
        seed: int = 0,
        channels_last: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        shard = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
        check(
            shard[1] >= 1 and 0 <= shard[0] < shard[1],
            "shard",
            shard,
            "(rank, world_size) with 0 <= rank < world_size",
        )
        self.device = torch.device(device)
        if self.device.type == "cuda":  # uint8 data set on the GPU once, not copied per epoch
            split = Split(split.images.to(self.device), split.labels.to(self.device))
        self.split, self.batch_size, self.train = split, batch_size, train
        self.crop_padding, self.flip, self.seed = crop_padding, check_flip(flip, "flip"), seed
        self.channels_last, self.shard = channels_last, shard
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch `epoch` from its batch `start` on (a run resumed inside the epoch): the
        batches before it are not gathered, but their random draws are, so the rest are the
        batches, crops and flips of the whole epoch."""
        self.epoch, self.start = epoch, start

    def _samples(self) -> int:
        """How many images this rank reads per epoch."""
        rank, world = self.shard
        n = len(self.split)
        return n // world if self.train else len(range(rank, n, world))

    def __len__(self) -> int:
        n = self._samples()
        return (
            n // self.batch_size
            if self.train and n >= self.batch_size
            else -(-n // self.batch_size)
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        rank, world = self.shard
        n = len(self.split)
        if not self.train:
            order = torch.arange(rank, n, world)
        else:
            # the same permutation on every rank; the images no rank reads (n % world) dropped
            order = torch.randperm(n, generator=g)[: self._samples() * world]
        # one step's images over all ranks; this rank's are positions rank, rank + world, ...
        step = self.batch_size * (world if self.train else 1)
        alternate = self.flip == "alternate"
        if alternate and self.train:  # a seeded coin per image, inverted on odd epochs
            coin = torch.rand(n, generator=torch.Generator().manual_seed(self.seed * 7919 + 1))
            flipped = (coin < 0.5) ^ bool(self.epoch % 2)
        for i in range(len(self)):
            chunk = order[i * step : (i + 1) * step]
            params = None
            if self.train:  # drawn for the whole global batch: identical on every rank
                random = self.flip is True
                params = crop_flip_params(len(chunk), self.crop_padding, random, g)
                if alternate:
                    params = (*params[:2], flipped[chunk])
                chunk = chunk[rank::world]
            if i < self.start:
                continue
            idx = chunk.to(self.split.labels.device)
            x = self.split.images[idx].to(self.device)  # no-ops when the split is on the device
            y = self.split.labels[idx].to(self.device)
            if params is not None:
                x = apply_crop_flip(
                    x, self.crop_padding, *(p if p is None else p[rank::world] for p in params)
                )
            yield self.normalize(x), y
