"""The data-set registry: `@register_dataset` loaders, looked up by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_dataset(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register a loader `load_NAME(root, download, **options)` under NAME."""
    _LOADERS[fn.__name__.removeprefix("load_")] = fn
    return fn


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def get_loader(name: str) -> Callable[..., Any]:
    return _LOADERS[name]
