"""What a checkpoint holds, and the model built from it.

A checkpoint is plain data (no pickled modules): the model's `arch` (how to call its builder),
its pruned per-layer `widths`, its `quant` config and its BN `fused` folds, beside its weights.
`model_from_checkpoint` replays those four steps on a fresh model, so a pruned, quantized or
fused model of any source (the zoo, torchvision, a user's builder) is rebuilt with no code.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from compress.errors import CheckpointError
from compress.fuse import apply_fused_structure_
from compress.models import create_from_arch, create_model, list_models
from compress.models.registry import accepts
from compress.prune import apply_widths_
from compress.prune.graph import PruneError
from compress.quant import quantize_, to_float

log = logging.getLogger(__name__)

SPEC_KEYS = ("arch", "widths", "quant", "fused")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The plain-data description of `model` that rebuilds its structure."""
    if not hasattr(model, "arch"):
        raise CheckpointError(
            f"{type(model).__name__} was not built by compress.models.create_model: its "
            "checkpoint could not be rebuilt"
        )
    return {
        "arch": dict(model.arch),
        "widths": dict(getattr(model, "pruned_widths", None) or {}) or None,
        "quant": getattr(model, "quant_config", None) or None,
        "fused": getattr(model, "fused", None) or None,
    }


def checkpoint_state(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Everything a checkpoint of `model` holds: its spec, its weights and `extra` plain data."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {**model_spec(model), "model": weights, **extra}


def arch_name(arch: dict[str, Any]) -> str:
    """A short name for logs and results: nin, torchvision/resnet18, custom/pkg.mod.fn."""
    source = arch.get("source", "zoo")
    if source == "zoo":
        return str(arch.get("name"))
    return f"{source}/{arch.get('name') or arch.get('target')}"


def model_overrides(arch: dict[str, Any]) -> str:
    """The command-line overrides that select this model: model=nin, model=torchvision
    model.name=resnet18, model=custom model.target=pkg.mod.fn."""
    source = arch.get("source", "zoo")
    if source == "zoo":
        return f"model={arch.get('name')}"
    if source in ("torchvision", "torchvision_det"):
        return f"model={source} model.name={arch.get('name')}"
    return f"model=custom model.target={arch.get('target')}"


def model_from_checkpoint(
    state: dict[str, Any], expect: str | None = None, quantized: bool = True
) -> nn.Module:
    """Rebuild the model stored in a checkpoint: architecture, widths, quantization, folds.

    `expect`: the model name the caller asked for; a checkpoint of another model is refused.
    `quantized=False` returns the float model (quantized layers share the float layers' weights);
    a fused checkpoint is always rebuilt as it was fused.
    """
    arch = dict(state["arch"])
    name = arch.get("name") or arch.get("target")
    if expect is not None and name != expect:
        raise CheckpointError(
            f"checkpoint holds a {arch_name(arch)!r} model but model={expect}; "
            f"pass model={name} to use it"
        )
    model = create_from_arch(arch)
    if state.get("widths"):
        try:
            apply_widths_(model, state["widths"])
        except PruneError as e:
            raise CheckpointError(f"checkpoint widths do not fit {arch_name(arch)}: {e}") from None
        model.pruned_widths = dict(state["widths"])
    fused = state.get("fused")
    if state.get("quant"):  # built as stored (PACT clips are weights too), made float below
        quantize_(model, state["quant"])
    if fused:
        apply_fused_structure_(model, fused)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint weights do not fit its {arch_name(arch)} architecture: "
            + load_error_line(e)
        ) from None
    if state.get("quant") and not quantized and not fused:
        to_float(model)
    return model


def load_error_line(e: RuntimeError) -> str:
    """The first line of load_state_dict's error that says what is wrong: torch's own first
    line ('Error(s) in loading state_dict for ResNet:') names only the class."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        return lines[1]
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------- plain state_dicts
def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _listed(keys: list[str], n: int = 3) -> str:
    more = f" ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _fits(model: nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == sd.keys() and all(own[k].shape == v.shape for k, v in sd.items())


def matching_zoo_model(
    sd: dict[str, torch.Tensor], num_classes: int, in_channels: int
) -> str | None:
    """The registered zoo model whose default build has exactly these keys and shapes."""
    for name in list_models():
        kw = {}
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if accepts("zoo", name, None, key):
                kw[key] = value
        try:
            candidate = create_model(name, **kw)
        except Exception:  # a builder that needs other arguments: not a candidate
            continue
        if _fits(candidate, sd):
            return name
    return None


def _head_only(
    model: nn.Module, mis: list[str], own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]
) -> str | None:
    """The module name when the mis-shaped keys are exactly one layer's weight / bias that
    differ only in their first dim (the class count): a classifier head to replace."""
    owners = {k.rpartition(".")[0] for k in mis}
    if len(owners) != 1:
        return None
    head = owners.pop()
    module = dict(model.named_modules()).get(head)
    if not isinstance(module, nn.Linear | nn.Conv2d) or f"{head}.weight" not in mis:
        return None
    return head if all(own[k].shape[1:] == sd[k].shape[1:] for k in mis) else None


def load_state_dict_(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    what: str,
    new_head: bool = True,
    num_classes: int | None = None,
    in_channels: int = 3,
) -> dict[str, Any] | None:
    """Load a plain state_dict into `model`, strictly: every key present, none left over, every
    shape equal. One exception, transfer learning (`new_head`): when the only differences are
    the class count of the classifier layer, that layer keeps its fresh initialization.

    Returns {"head": name, "from_classes": n, "to_classes": m} when the head was replaced, else
    None. A misfit raises CheckpointError naming the first missing, unexpected and mis-shaped
    keys, and the zoo model that fits the file when one does (`what`: the file, for the message).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mis = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    head = _head_only(model, mis, own, sd) if new_head and not missing and not unexpected else None
    if (missing or unexpected or mis) and head is None:
        parts = []
        if missing:
            parts.append(f"missing keys {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listed(unexpected)}")
        if mis:
            k = mis[0]
            parts.append(
                f"mis-shaped {k} (file {_shape(sd[k])}, model {_shape(own[k])})"
                + (f" and {len(mis) - 1} more" if len(mis) > 1 else "")
            )
        name = arch_name(model.arch) if hasattr(model, "arch") else type(model).__name__
        hint = ""
        if num_classes is not None:
            fits = matching_zoo_model(sd, num_classes, in_channels)
            if fits is not None:
                hint = f"; it fits model={fits}" + (
                    " with its default settings (drop the model.* overrides)"
                    if fits == getattr(model, "arch", {}).get("name")
                    else ""
                )
        raise CheckpointError(
            f"{what}: the state_dict does not fit {name}: " + "; ".join(parts) + hint
        )
    if head is None:
        model.load_state_dict(sd)
        return None
    kept = {k: v for k, v in sd.items() if k not in mis}
    fresh = {k: own[k] for k in mis}
    model.load_state_dict({**kept, **fresh})
    info = {
        "head": head,
        "from_classes": int(sd[f"{head}.weight"].shape[0]),
        "to_classes": int(own[f"{head}.weight"].shape[0]),
    }
    log.info(
        "transfer learning: %s has %d classes in %s, the data set %d; it starts fresh",
        head,
        info["from_classes"],
        what,
        info["to_classes"],
    )
    return info
