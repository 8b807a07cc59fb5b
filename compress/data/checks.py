"""What every data loader checks before it trusts its input: the root, an image folder's layout
and classes, subset sizes. One place, so the in-memory and streamed paths refuse a bad folder
with the same line."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from compress.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# OmegaConf's mark of a mandatory value nobody set (conf/dataset/imagefolder.yaml: `root: ???`);
# resolved to a plain container it arrives here as this string.
MISSING = "???"
UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for a truncated or foreign file


def require_root(name: str, root: str | Path) -> None:
    """Refuse a data root that was never set, naming the key instead of echoing '???'."""
    if str(root) == MISSING:
        raise ConfigError(
            f"dataset.root is not set: dataset={name} needs dataset.root=PATH, the folder "
            "that holds train/<class>/ and test/<class>/ (or val/)"
        )


def folder_classes(name: str, folder: Path) -> list[str]:
    """The sorted class folders of one split; none at all is refused."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(
            f"dataset {name}: no images under {folder}/<class>/ (no class folders; "
            f"each image goes into {folder}/<class>/)"
        )
    return classes


def image_folder_layout(
    name: str, root: Path, test_names: Sequence[str] = ("val", "test")
) -> tuple[Path, Path, list[str]]:
    """(train dir, test dir, classes) of ROOT/train/<class>/ and ROOT/<test_names[0]>/<class>/
    (or the other names), both splits with the same class folders (else the labels would not
    match)."""
    root = Path(root)
    other = f"{test_names[0]}/" + "".join(f" (or {n}/)" for n in test_names[1:])
    if not root.is_dir():
        raise DataError(
            f"dataset {name}: {root} not found; set dataset.root (or COMPRESS_DATA_DIR) to "
            f"the folder that holds train/ and {other}"
        )
    train_dir = root / "train"
    test_dir = next((root / d for d in test_names if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        missing = "train/" if not train_dir.is_dir() else other
        raise DataError(
            f"dataset {name}: no {missing} folder in {root}: expected {root}/train/<class>/ "
            f"and {root}/{test_names[0]}/<class>/"
            + "".join(f" (or {n}/)" for n in test_names[1:])
            + " folders of images"
        )
    classes = folder_classes(name, train_dir)
    test_classes = folder_classes(name, test_dir)
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        side = (
            f"{', '.join(only_train[:5])} in train/ but not in {test_dir.name}/"
            if only_train
            else f"{', '.join(only_test[:5])} in {test_dir.name}/ but not in train/"
        )
        raise DataError(
            f"dataset {name}: the labels would not match: class {side} "
            f"({len(only_train) + len(only_test)} differ); both need the same class folders"
        )
    return train_dir, test_dir, classes


def refuse_empty_classes(
    name: str, folder: Path, classes: Sequence[str], counts: Sequence[int], exts: str
) -> None:
    """No images at all, or a class folder without any, is refused: a class that no image
    teaches would still get an output and silently distort accuracy."""
    if not any(counts):
        raise DataError(f"dataset {name}: no images under {folder}/<class>/ (looked for {exts})")
    empty = [c for c, k in zip(classes, counts, strict=True) if k == 0]
    if empty:
        raise DataError(
            f"dataset {name}: class folder {folder / empty[0]} has no images "
            f"({len(empty)} empty: {', '.join(empty[:5])}; looked for {exts})"
        )


def subset_size(key: str, n: int | None, total: int, what: str) -> int | None:
    """`dataset.train_subset` / `test_subset` against the data there is: a count larger than
    the split is clamped to all of it, with a warning that says so (a recipe that caps the
    size still runs on a smaller data set, and nobody believes it used more than it did)."""
    if n is not None and n > total:
        log.warning(
            "dataset.%s=%d is more than the %d %s images: using all %d", key, n, total, what, total
        )
        return None
    return n
