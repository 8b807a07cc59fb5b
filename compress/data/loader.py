"""Batches from uint8 tensors, with augmentation and normalization done batched on the device.

No per-image Python work: a batch is gathered, moved to the device as uint8 (4x less traffic
than float; on a GPU the whole uint8 set lives there), cropped and flipped with tensor
indexing, then converted and normalized.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from compress.data.datasets import Split


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
    same whether a run got there directly or resumed from a checkpoint.
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
        flip: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":  # uint8 data set on the GPU once, not copied per epoch
            split = Split(split.images.to(self.device), split.labels.to(self.device))
        self.split, self.batch_size, self.train = split, batch_size, train
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
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
        n = len(self.split)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size].to(
                self.split.labels.device
            )
            x = self.split.images[idx].to(self.device)  # no-ops when the split is on the device
            y = self.split.labels[idx].to(self.device)
            if self.train:
                x = random_crop_flip(x, self.crop_padding, self.flip, g)
            yield self.normalize(x), y
