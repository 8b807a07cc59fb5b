"""Model registry: `@register_model` builders, looked up by name with `create_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from compress.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; the result remembers how it was built in `model.arch`.

    `model.arch` ({"name": ..., **kwargs}) is stored in checkpoints so that a model, pruned
    or not, can be rebuilt exactly from the checkpoint alone.
    """
    if name not in _MODELS:
        raise ConfigError(f"model={name!r} is unknown: expected one of {', '.join(list_models())}")
    fn = _MODELS[name]
    try:
        bound = inspect.signature(fn).bind(**kwargs)
    except TypeError as e:  # an unknown keyword in the model config
        raise ConfigError(f"model={name}: {e}") from None
    bound.apply_defaults()
    model = fn(**bound.arguments)
    model.arch = {"name": name, **bound.arguments}
    return model
