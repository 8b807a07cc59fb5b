"""`load_dataset`: any registered data set by name, in memory or streamed from disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.data import datasets  # noqa: F401  (registers the in-memory data sets)
from compress.data.checks import require_root, subset_size
from compress.data.datasets import DataSet
from compress.data.folder import FolderDataSet, load_streaming
from compress.data.registry import get_loader, list_datasets
from compress.errors import check, check_choice


def load_dataset(
    name: str,
    root: str | Path = "data",
    download: bool = False,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> DataSet | FolderDataSet:
    """Load a registered data set by name, optionally cut to seeded random subsets (a subset
    larger than its split is all of it, with a warning)."""
    check_choice("dataset.name", name, list_datasets())
    for key, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        check(n is None or n >= 1, f"dataset.{key}", n, "a positive integer or null")
    require_root(name, root)
    if "streaming" in kwargs:  # image folders: read from disk batch by batch (folder.py), or not
        streamed = load_streaming(
            name, Path(root), download, train_subset, test_subset, seed, kwargs
        )
        if streamed is not None:
            return streamed  # type: ignore[return-value]
    ds = get_loader(name)(root=Path(root), download=download, **kwargs)
    train_subset = subset_size("train_subset", train_subset, len(ds.train), "training")
    test_subset = subset_size("test_subset", test_subset, len(ds.test), "test")
    ds.train = ds.train.subset(train_subset, seed)
    ds.test = ds.test.subset(test_subset, seed + 1)
    return ds
