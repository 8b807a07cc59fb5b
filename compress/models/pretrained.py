"""Where torchvision's trained weights come from: a file the user names, or torch hub's local
cache; the network only when the user allows it (`model.download=true`).

torchvision's own `weights=` argument downloads whenever the file is not cached and insists on
the weights' class count; here the model is always built with `weights=None` for the data set's
classes and the file is loaded afterwards (compress.spec.load_state_dict_), so ImageNet weights
start a 10-class model with a fresh head, and a machine without internet still works from a
copied file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision.models as tvm

from compress.errors import CheckpointError, ConfigError

FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def looks_like_path(value: str) -> bool:
    return "/" in value or value.endswith(FILE_SUFFIXES) or Path(value).exists()


def hub_cache_file(url: str) -> Path:
    """Where torch.hub keeps the file of `url` (TORCH_HOME / ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def weights_enum(model: str, name: str) -> tvm.WeightsEnum:
    """torchvision's weights entry `name` (DEFAULT, IMAGENET1K_V1, or ResNet18_Weights.X)."""
    try:
        choices = tvm.get_model_weights(model)
    except (KeyError, ValueError):
        raise ConfigError(f"model.weights={name}: torchvision has no weights for {model}") from None
    short = name.rpartition(".")[2]
    if short not in choices.__members__:
        raise ConfigError(
            f"model.weights={name} is invalid: expected a file or one of "
            + ", ".join(choices.__members__)
            + f" (torchvision's weights of {model})"
        )
    return choices[short]


def torchvision_weights_file(model: str, weights: str, download: bool = False) -> Path:
    """The local file holding `weights` (a path, or a torchvision weights name) of `model`."""
    if looks_like_path(weights):
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"model.weights={weights}: the file does not exist")
        return path
    entry = weights_enum(model, weights)
    path = hub_cache_file(entry.url)
    if path.is_file():
        return path
    if not download:
        raise CheckpointError(
            f"model.weights={weights}: {path.name} is not in the local torch hub cache "
            f"({path.parent}); copy it there or pass model.weights=PATH, or allow the "
            f"download from {entry.url} with model.download=true"
        )
    torch.hub.load_state_dict_from_url(entry.url, progress=True, check_hash=True)
    return path
