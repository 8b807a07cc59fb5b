"""Multi-stage runs: `schedule.stages` lists stages that run in order in one run directory.

Each stage writes its own subfolder `NN_name/` (checkpoints, metrics.json, TensorBoard) and
starts from the checkpoint the previous stage produced (`best.pt`, `pruned.pt`, `fused.pt`).
A stage is a string (its kind) or a dict:

    {stage: quantize, name: w4a4, epochs: 10, lr: 0.01, quant: {weight: {bits: 4}}}

`stage` is the kind, `name` the folder label; `quant`, `model`, `dataset`, `pruner`,
`sparsity` and `calib` entries are merged into those groups, and every other key overrides
`schedule`. `calibrate` (post-training INT8 in ONNX Runtime) and `export` (the previous
stage's model as a runtime file; a QAT model as its integer QDQ graph; `format`, `int8`,
`requant_batches`, `latency` as in export.py) can only be the last stage.
With `resume=true`, finished stages (those with a stage.json) are skipped and the interrupted
one continues from its last.pt.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.cli import write_json
from compress.config import validate_run
from compress.deploy.onnx_export import BUILT
from compress.deploy.ptq import validate_calib
from compress.errors import ConfigError, check_choice
from compress.tasks import calibrate as calibrate_task
from compress.tasks import export as export_task
from compress.tasks import fuse as fuse_task
from compress.tasks import prune as prune_task
from compress.tasks import train as train_task

log = logging.getLogger(__name__)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _train_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    train_task.run(cfg, stage_dir)
    return stage_dir / "best.pt"


def _sparse_train_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    cfg = _merge(cfg, {"sparsity": {"enabled": True}})
    return _train_stage(cfg, stage_dir)


def _prune_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    prune_task.run({**cfg, "ckpt": cfg["init_from"]}, stage_dir)
    return stage_dir / "pruned.pt"


def _fuse_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    fuse_task.run({**cfg, "ckpt": cfg["init_from"]}, stage_dir)
    return stage_dir / "fused.pt"


def _calibrate_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    """Post-training INT8 of the previous stage's model (ONNX Runtime); the last stage: what it
    writes is an ONNX file, not weights a later stage could train."""
    calib = {**calibrate_task.CALIB_DEFAULTS, **(cfg.get("calib") or {})}
    calibrate_task.run(
        {**cfg, "ckpt": cfg["init_from"], "calib": calib, "device": "cpu"}, stage_dir
    )
    return Path(cfg["init_from"])


def _export_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    """The previous stage's model in `format`, checked in its runtime; the last stage."""
    export_task.run({**cfg, "ckpt": cfg["init_from"], "device": "cpu"}, stage_dir)
    return Path(cfg["init_from"])


# A stage runner takes the stage's config and folder and returns the checkpoint it produced.
STAGE_KINDS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "train": _train_stage,  # from init_from when given, else from scratch
    "sparse_train": _sparse_train_stage,  # train with L1 on BN scales (network slimming)
    "prune": _prune_stage,  # thin the previous stage's model (pruner group)
    "finetune": _train_stage,  # from the previous stage
    "quantize": _train_stage,  # from the previous stage, with this stage's quant config
    "fuse": _fuse_stage,  # fold BNs of the previous stage's model
    "calibrate": _calibrate_stage,  # INT8 ONNX of the previous stage's model (last stage only)
    "export": _export_stage,  # the previous stage's model as a runtime file (last stage only)
}
NEEDS_INPUT = {"prune", "finetune", "quantize", "fuse", "calibrate", "export"}
LAST_ONLY = {"calibrate": "an INT8 ONNX model", "export": "a runtime file"}
GROUP_KEYS = ("quant", "model", "dataset", "pruner", "sparsity", "calib")
# calibrate / export options that live at the top of their configs
TOP_KEYS = ("latency", "format", "int8", "requant_batches", "opset")


def plan(cfg: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Resolve `schedule.stages` into (kind, folder name, stage config) triples, validated."""
    stages = cfg["schedule"].get("stages") or []
    base = copy.deepcopy(cfg)
    base["schedule"] = {k: v for k, v in base["schedule"].items() if k != "stages"}
    out, have_weights = [], bool(cfg.get("init_from") or cfg.get("refine"))
    for i, spec in enumerate(stages):
        spec = {"stage": spec} if isinstance(spec, str) else dict(spec)
        kind = spec.pop("stage", None)
        check_choice(f"schedule.stages[{i}].stage", kind, sorted(STAGE_KINDS))
        name = str(spec.pop("name", kind))
        if kind in NEEDS_INPUT and not have_weights:
            raise ConfigError(
                f"schedule.stages[{i}]={kind} needs trained weights, but no earlier stage trains "
                "a model and init_from is not set: put a train stage first or pass init_from=PATH"
            )
        if kind in LAST_ONLY and i != len(stages) - 1:
            raise ConfigError(
                f"schedule.stages[{i}]={kind} must be the last stage: it writes "
                f"{LAST_ONLY[kind]}, not weights a later stage could train"
            )
        if kind == "calibrate":
            validate_calib({**calibrate_task.CALIB_DEFAULTS, **(spec.get("calib") or {})})
        if kind == "export":  # everything export.py checks before loading, before any training
            check_choice(f"schedule.stages[{i}].format", spec.get("format", "onnx"), BUILT)
            export_task.check_common({**spec, "device": "cpu"}, BUILT)
            export_task.int8_choice(spec)
            export_task.requant_batches(spec)
        groups = {k: spec.pop(k) for k in (*GROUP_KEYS, *TOP_KEYS) if k in spec}
        stage_cfg = _merge(base, {**groups, "schedule": spec})
        stage_cfg["resume"], stage_cfg["refine"] = False, None
        validate_run(stage_cfg, where=f"schedule.stages[{i}]")  # all stages before any trains
        out.append((kind, f"{i:02d}_{name}", stage_cfg))
        have_weights = True
    return out


def run_pipeline(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run `cfg` as a single training run, or as its `schedule.stages` in order."""
    run_dir = Path(run_dir)
    if not cfg["schedule"].get("stages"):
        validate_run(cfg)
        return train_task.run(cfg, run_dir)
    stages = plan(cfg)
    first = cfg.get("init_from") or cfg.get("refine")
    previous: Path | None = Path(first) if first else None
    results = []
    for kind, folder, stage_cfg in stages:
        stage_dir = run_dir / folder
        done = stage_dir / "stage.json"
        if previous is not None:
            stage_cfg["init_from"] = str(previous)
        if cfg.get("resume") and done.exists():
            log.info("stage %s: finished earlier, skipped", folder)
        else:
            stage_cfg["resume"] = bool(cfg.get("resume")) and (stage_dir / "last.pt").exists()
            log.info("stage %s (%s)%s", folder, kind, " resumed" if stage_cfg["resume"] else "")
            ckpt = STAGE_KINDS[kind](stage_cfg, stage_dir)
            write_json(done, {"kind": kind, "checkpoint": ckpt.name})
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        metrics.pop("history", None)
        results.append({"stage": folder, "kind": kind, **metrics})
        previous = stage_dir / json.loads(done.read_text())["checkpoint"]
    summary = {**results[-1], "stages": results}
    write_json(run_dir / "metrics.json", summary)
    return summary
