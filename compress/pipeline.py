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
one continues from its last.pt. A prune stage with `pruner.steps` > 1 prunes and finetunes in
turns, each step in a folder of its own, resumable the same way (`_iterative_prune_stage`).
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
from compress.prune import agp_schedule
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
    steps = prune_task.pruner_settings(cfg)["steps"]
    if steps > 1:
        return _iterative_prune_stage(cfg, stage_dir)
    prune_task.run({**cfg, "ckpt": cfg["init_from"]}, stage_dir)
    return stage_dir / "pruned.pt"


def _iterative_prune_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    """`pruner.steps` = K prune-finetune cycles (Zhu & Gupta 2017): cycle k prunes the model
    the last one finetuned down to the fraction s_k of the stage's input (its channels or
    MACs) that the cubic schedule says, then finetunes it `pruner.finetune_epochs` epochs with
    the stage's schedule through the train task (distillation, resume and TensorBoard as a
    train stage has them). Cycle k lives in `NN_stepk/`: pruned.pt and prune.json (the prune),
    best.pt, last.pt, metrics.json and tb/ (the finetune), step.json once it is done. The
    stage's checkpoint is the last cycle's best.pt, as a train stage's is its best.pt.

    With resume=true finished cycles (step.json) are skipped, a pruned model (prune.json) is
    not pruned again, and an interrupted finetune continues from its last.pt.
    """
    p = prune_task.pruner_settings(cfg)
    resume = bool(cfg.get("resume"))
    original, current = Path(cfg["init_from"]), Path(cfg["init_from"])
    cycles = []
    for k, fraction in enumerate(agp_schedule(p["percent"], p["steps"]), 1):
        step_dir = stage_dir / f"{k:02d}_step{k}"
        done = step_dir / "step.json"
        if resume and done.exists():
            log.info("prune step %d/%d: finished earlier, skipped", k, p["steps"])
        else:
            if not (resume and (step_dir / "prune.json").exists()):
                log.info("prune step %d/%d: %.4f of the %s", k, p["steps"], fraction, p["target"])
                prune_cfg = {**cfg, "ckpt": str(current)}
                prune_cfg["pruner"] = {**p, "percent": fraction, "steps": 1}
                prune_task.run(prune_cfg, step_dir, reference=original, metrics_file="prune.json")
            finetune = {
                **cfg,
                "init_from": str(step_dir / "pruned.pt"),
                "refine": None,
                "resume": resume and (step_dir / "last.pt").exists(),
                "schedule": {**cfg["schedule"], "epochs": p["finetune_epochs"]},
            }
            train_task.run(finetune, step_dir)
            write_json(done, {"step": k, "fraction": fraction, "checkpoint": "best.pt"})
        pruned = json.loads((step_dir / "prune.json").read_text())
        tuned = json.loads((step_dir / "metrics.json").read_text())
        cycles.append(
            {
                "step": k,
                "fraction": fraction,
                "channels": pruned["channels"],
                "macs": pruned["macs"],
                "macs_ratio": pruned["macs_ratio_reference"],
                "test_acc_pruned": pruned["test_acc"],
                "test_acc": tuned["test_acc"],
                "best_test_acc": tuned["best_test_acc"],
            }
        )
        current = step_dir / "best.pt"
    first = json.loads((stage_dir / "01_step1" / "prune.json").read_text())
    tuned.pop("history", None)
    summary = {
        **tuned,
        **{key: pruned[key] for key in ("pruner", "importance", "scope", "target", "channels")},
        "percent": p["percent"],
        "steps": p["steps"],
        **{key: first[key] for key in ("channels_before", "params_before", "macs_before")},
        "test_acc_before": first["test_acc_before"],
        "params_ratio": tuned["params"] / first["params_before"],
        "macs_ratio": tuned["macs"] / first["macs_before"],
        "cycles": cycles,
    }
    write_json(stage_dir / "metrics.json", summary)
    return current


def _fuse_stage(cfg: dict[str, Any], stage_dir: Path) -> Path:
    """Fold the previous stage's BNs, exactly (a quantized model keeps its every rounding:
    compress.fuse); metrics.json holds max |logit diff| and top-1 agreement with the unfused
    model on the test set, as fuse.py reports them."""
    metrics = fuse_task.run({**cfg, "ckpt": cfg["init_from"]}, stage_dir)
    log.info("stage %s: %s", stage_dir.name, fuse_task.agreement_line(metrics))
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
GROUP_KEYS = ("quant", "model", "dataset", "pruner", "sparsity", "calib", "distill")
# the stages that compress: `distill.teacher=self` in them and after them is the model before
# the first of them (the uncompressed one), not the stage's own, already compressed, input
COMPRESSING = {"prune", "quantize"}
# calibrate / export options that live at the top of their configs
TOP_KEYS = ("latency", "format", "int8", "requant_batches", "opset")


def _started(kind: str, stage_dir: Path) -> bool:
    """Whether an interrupted stage left something to continue from: a training stage its
    last.pt, an (iterative) prune stage the steps in its folder."""
    if kind == "prune":
        return stage_dir.is_dir()
    return (stage_dir / "last.pt").exists()


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


def _resolve_teacher(stage_cfg: dict[str, Any], start: Path | None) -> None:
    """`distill.teacher=self` in a stage: the uncompressed model (see COMPRESSING), a path."""
    distill = stage_cfg.get("distill") or {}
    if distill.get("kind") == "kd" and distill.get("teacher", "self") == "self" and start:
        stage_cfg["distill"] = {**distill, "teacher": str(start)}


def run_pipeline(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Run `cfg` as a single training run, or as its `schedule.stages` in order."""
    run_dir = Path(run_dir)
    if not cfg["schedule"].get("stages"):
        validate_run(cfg)
        return train_task.run(cfg, run_dir)
    stages = plan(cfg)
    first = cfg.get("init_from") or cfg.get("refine")
    previous: Path | None = Path(first) if first else None
    uncompressed: Path | None = None
    results = []
    for kind, folder, stage_cfg in stages:
        stage_dir = run_dir / folder
        done = stage_dir / "stage.json"
        if previous is not None:
            stage_cfg["init_from"] = str(previous)
        if kind in COMPRESSING and uncompressed is None:
            uncompressed = previous
        _resolve_teacher(stage_cfg, uncompressed or previous)
        if cfg.get("resume") and done.exists():
            log.info("stage %s: finished earlier, skipped", folder)
        else:
            stage_cfg["resume"] = bool(cfg.get("resume")) and _started(kind, stage_dir)
            log.info("stage %s (%s)%s", folder, kind, " resumed" if stage_cfg["resume"] else "")
            try:
                ckpt = STAGE_KINDS[kind](stage_cfg, stage_dir)
            except FloatingPointError as e:  # divergence: say which stage (same type: exit 3)
                raise type(e)(f"stage {folder}: {e}") from e
            # relative to the stage folder: an iterative prune stage's is in a step's folder
            name = ckpt.relative_to(stage_dir) if ckpt.is_relative_to(stage_dir) else ckpt.name
            write_json(done, {"kind": kind, "checkpoint": str(name)})
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        metrics.pop("history", None)
        results.append({"stage": folder, "kind": kind, **metrics})
        previous = stage_dir / json.loads(done.read_text())["checkpoint"]
    summary = {**results[-1], "stages": results}
    write_json(run_dir / "metrics.json", summary)
    return summary
