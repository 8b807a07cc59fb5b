"""What a checkpoint holds, and the model built from it.

A checkpoint is plain data (no pickled modules): the model's `arch` (how to call its builder),
its pruned per-layer `widths`, its `quant` config and its BN `fused` folds, beside its weights.
`model_from_checkpoint` replays those four steps on a fresh model, so a pruned, quantized or
fused model of any source (the zoo, torchvision, a user's builder) is rebuilt with no code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compress.errors import CheckpointError
from compress.fuse import apply_fused_structure_
from compress.models import create_from_arch
from compress.prune import apply_widths_
from compress.prune.graph import PruneError
from compress.quant import quantize_, to_float

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
    if source == "torchvision":
        return f"model=torchvision model.name={arch.get('name')}"
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
        first = str(e).splitlines()[0]
        raise CheckpointError(
            f"checkpoint weights do not fit its {arch_name(arch)} architecture: {first}"
        ) from None
    if state.get("quant") and not quantized and not fused:
        to_float(model)
    return model
