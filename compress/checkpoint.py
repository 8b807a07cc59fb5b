"""Checkpoint files: plain dicts of tensors and builtins, written atomically, loaded with
weights_only, with errors that name the file. What a checkpoint holds is `compress.spec`'s
business; this module only reads and writes.

Two kinds of file are read: this project's checkpoints (a format tag, the architecture, the
weights) and a plain `state_dict` saved by someone else's training script
(`torch.save(model.state_dict(), f)`, or a dict holding one under a usual key). The second
carries no architecture: the caller builds the model from its config and loads the weights.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from compress.errors import CheckpointError

FORMAT = "compress/1"
# keys under which training scripts commonly nest their state_dict
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# prefixes a wrapper adds to every key: DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def _load(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason})") from None


def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is one of this project's checkpoints."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "arch" in obj


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`."""
    path = Path(path)
    state = _load(path, map_location)
    if not is_checkpoint(state):
        raise CheckpointError(f"{path} is not a compress checkpoint (no '{FORMAT}' format tag)")
    return state


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrapped(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefix a DDP or torch.compile wrapper put on every one of them."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The plain state_dict in a loaded object: the object itself, or one nested under a usual
    key (`state_dict`, `model`, `model_state_dict`, ...); None when there is none."""
    if _tensor_dict(obj):
        return _unwrapped(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _tensor_dict(obj.get(key)):
                return _unwrapped(obj[key])
    return None


def load_weights_file(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[str, dict[str, Any]]:
    """Read a checkpoint or a plain state_dict file: ("checkpoint", state) or ("state_dict",
    {parameter name: tensor}). Anything else is refused with one line naming the file."""
    path = Path(path)
    obj = _load(path, map_location)
    if is_checkpoint(obj):
        return "checkpoint", obj
    sd = as_state_dict(obj)
    if sd is None:
        what = type(obj).__name__
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else ""
        raise CheckpointError(
            f"{path} is neither a compress checkpoint nor a state_dict (a {what}"
            + (f" with keys {keys}" if keys else "")
            + "; expected torch.save(model.state_dict(), f) or a dict holding one under "
            + ", ".join(STATE_DICT_KEYS[:3])
            + ")"
        )
    return "state_dict", sd
