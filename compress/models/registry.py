"""Model registry: `@register_model` builders, looked up by name with `create_model`, and the
sources from outside the zoo: torchvision classification builders, torchvision detectors
(`torchvision_det`, at a CPU size: compress.detection.models) and a user's own builder named
by its import path (Hydra's `_target_` style)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from compress.detection.models import build_detector, check_detector_name
from compress.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
SOURCES = ("zoo", "torchvision", "torchvision_det", "custom")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def _call(
    fn: Callable[..., nn.Module], what: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict]:
    """Call a builder with `kwargs`; returns the model and the arguments that rebuild it
    (defaults applied, a **kwargs catch-all flattened so the record can be replayed)."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(**kwargs)
    except TypeError as e:  # an unknown keyword in the model config
        raise ConfigError(f"{what}: {e}") from None
    bound.apply_defaults()
    args: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            args.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            args[name] = value
    try:
        model = fn(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{what} returned a {type(model).__name__}, not a torch nn.Module")
    return model, args


def accepts(source: str, name: str | None, target: str | None, key: str) -> bool:
    """Whether the builder takes keyword `key` (by name or through **kwargs)."""
    fn = _builder(source, name, target)
    params = inspect.signature(fn).parameters.values()
    return any(p.name == key or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _import(target: str) -> Callable[..., nn.Module]:
    module, _, attr = target.rpartition(".")
    if not module:
        raise ConfigError(f"model.target={target!r} is invalid: expected package.module.builder")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"model.target={target}: cannot import {module} ({e})") from None
    except AttributeError:
        raise ConfigError(f"model.target={target}: {module} has no {attr!r}") from None
    if not callable(fn):
        raise ConfigError(f"model.target={target} is not callable")
    return fn


def _builder(source: str, name: str | None, target: str | None) -> Callable[..., nn.Module]:
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is invalid: expected one of {SOURCES}")
    if source == "custom":
        if not target:
            raise ConfigError("model=custom needs model.target=package.module.builder")
        return _import(target)
    if source == "torchvision":
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)
        if name not in names:
            raise ConfigError(
                f"model.name={name!r} is not a torchvision classification model: expected one "
                f"of {', '.join(names[:8])}, ... ({len(names)} in all)"
            )
        return tvm.get_model_builder(name)
    if source == "torchvision_det":
        check_detector_name(name)
        return functools.partial(build_detector, name)
    if name not in _MODELS:
        raise ConfigError(f"model={name!r} is unknown: expected one of {', '.join(list_models())}")
    return _MODELS[name]


def create_model(
    name: str | None = None, *, source: str = "zoo", target: str | None = None, **kwargs: Any
) -> nn.Module:
    """Build a model; the result remembers how it was built in `model.arch`.

    source="zoo": a registered builder (`create_model("nin_gc", num_classes=10)`);
    "torchvision": `create_model("resnet18", source="torchvision", num_classes=10)`;
    "custom": `create_model(source="custom", target="pkg.module.builder", **kwargs)`.
    `model.arch` is stored in checkpoints so a model, pruned or not, is rebuilt from it alone.
    """
    fn = _builder(source, name, target)
    what = {
        "zoo": f"model={name}",
        "torchvision": f"torchvision model {name}",
        "torchvision_det": f"torchvision detector {name}",
    }.get(source, f"model.target={target}")
    model, args = _call(fn, what, kwargs)
    head = {"name": name} if source == "zoo" else {"source": source}
    if source in ("torchvision", "torchvision_det"):
        head["name"] = name
    if source == "custom":
        head["target"] = target
    if source == "torchvision":  # trained weights come from the checkpoint, never a download
        args["weights"] = None
    model.arch = {**head, **args}
    return model


def create_from_arch(arch: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its `arch` record."""
    arch = dict(arch)
    return create_model(
        arch.pop("name", None),
        source=arch.pop("source", "zoo"),
        target=arch.pop("target", None),
        **arch,
    )
