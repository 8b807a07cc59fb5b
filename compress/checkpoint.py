"""Checkpoints: plain dicts of tensors and builtins, written atomically, loaded with weights_only.

A checkpoint carries the model's `arch` ({"name", **kwargs}, including a pruned channel spec),
so `model_from_checkpoint` rebuilds the exact architecture without any code or manual edits.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CheckpointError
from compress.models import create_model

FORMAT = "compress/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "arch" not in state:
        raise CheckpointError(f"{path} is not a compress checkpoint (no '{FORMAT}' format tag)")
    return state


def model_from_checkpoint(
    state: dict[str, Any], expect: str | None = None, quantized: bool = True
) -> nn.Module:
    """Rebuild the model stored in a checkpoint: its architecture, its weights, its quantization.

    `expect`: the model name the caller asked for; a checkpoint of another family is refused.
    `quantized=False` returns the float model (quantized layers share the float layers' weights);
    a fused checkpoint is always rebuilt as it was fused.
    """
    arch = dict(state["arch"])
    name = arch.pop("name")
    if expect is not None and name != expect:
        raise CheckpointError(
            f"checkpoint holds a {name!r} model but model={expect}; pass model={name} to use it"
        )
    model = create_model(name, **arch)
    fused = state.get("fused")
    if state.get("quant") and (quantized or fused):
        from compress.quant import quantize_  # the quant package builds on this module

        quantize_(model, state["quant"])
    if fused:
        from compress.fuse import apply_fused_structure_

        apply_fused_structure_(model, fused)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint weights do not fit its {name} architecture: {first}"
        ) from None
    return model
