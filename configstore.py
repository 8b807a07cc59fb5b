"""The config schemas in Hydra's ConfigStore: the YAML files in conf/ extend them.

`register()` (called when train.py, prune.py or fuse.py is imported) stores the dataclasses of
`compress.config` as the base of each typed group, and one schema per entry point for the
primary config, so Hydra itself rejects a misspelt key or a value of the wrong type while it
composes the config (`schedule.epoch=3`, `quant.weight.bitz=3`, `schedule.epochs=abc`):

    name            node                      extended by
    base_schedule   ScheduleConfig            conf/schedule/*.yaml
    base_quant      QuantConfig               conf/quant/*.yaml
    base_pruner     PrunerConfig              conf/pruner/*.yaml
    base_distill    DistillConfig             conf/distill/*.yaml
    base_train      TrainRun (sparsity, ...)  conf/train.yaml
    base_prune      PruneRun                  conf/prune.yaml
    base_fuse       FuseRun                   conf/fuse.yaml

Each group's YAML file starts with `defaults: [/base_x@_here_, _self_]` and holds only what
differs from the schema's defaults; an entry's YAML with `defaults: [base_x, _self_]`. The
group schemas are stored outside their groups (no `group=`) and pulled in by absolute name into
the file's own package (`@_here_`), so Hydra does not list them among a group's options: a
misspelt `quant=w4a5` lists fp32, w4a4, ..., and `--help` only the real choices. Range checks
(bits, percent, lr, ...) stay in `compress.config`, which the library runs on the composed
config (and library users on their own dicts).
See https://hydra.cc/docs/tutorials/structured_config/schema/.

It also holds what every entry point does with Hydra around its `run(cfg, run_dir)`:
`hydra_job` (a multirun job that fails is recorded and the sweep goes on) and
`exit_if_jobs_failed` (the process then exits 1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf

from compress.cli import sweep_job
from compress.config import (
    DistillConfig,
    PrunerConfig,
    QuantConfig,
    ScheduleConfig,
    SparsityConfig,
)
from compress.report import SweepReport

T = TypeVar("T")


@dataclass
class TrainRun:
    """conf/train.yaml: the groups (model and dataset stay free-form) and the top-level keys."""

    model: Any = None
    dataset: Any = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False  # continue the run in hydra.run.dir from its last.pt
    init_from: str | None = None  # start from another run's checkpoint
    refine: str | None = None  # the same as init_from


@dataclass
class PruneRun:
    """conf/prune.yaml."""

    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    dataset: Any = None  # null: the data set the checkpoint was trained on
    model: Any = None  # a plain state_dict as ckpt: the model it holds (model=NAME)
    ckpt: str = MISSING
    seed: int = 0
    device: str = "cpu"


@dataclass
class FuseRun:
    """conf/fuse.yaml."""

    dataset: Any = None  # null: the data set the checkpoint was trained on
    model: Any = None  # a plain state_dict as ckpt: the model it holds (model=NAME)
    ckpt: str = MISSING
    seed: int = 0
    device: str = "cpu"


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as the plain dict the library takes. The data root is also kept as
    written (`dataset.root_template`, e.g. ${oc.env:COMPRESS_DATA_DIR,data}) so prune.py and
    fuse.py re-resolve it at their run time instead of trusting where the data lived today."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    dataset = cfg.get("dataset")
    if isinstance(dataset, DictConfig):
        root = OmegaConf.to_container(dataset, resolve=False).get("root")
        if isinstance(root, str) and "${" in root:
            plain["dataset"]["root_template"] = root
    return plain


def hydra_job(run: Callable[[DictConfig, Path], T], cfg: DictConfig) -> T | float:
    """Call an entry point's `run(cfg, run_dir)` in the run directory Hydra chose.

    In a multirun (`-m`) through `compress.cli.sweep_job`: the entry's error handler exits on
    a bad value, and an exit inside a job ends Hydra's whole sweep, so a failing job is
    recorded in its failed.json instead (NaN to the sweeper) and the next job runs."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return sweep_job(lambda: run(cfg, run_dir), run_dir)
    return run(cfg, run_dir)


def exit_if_jobs_failed() -> None:
    """After the Hydra main returned: exit 1 when the multirun that just ended had a failed or
    diverged job. The sweep report (compress.report.SweepReport, the callback every entry's
    conf/hydra/default.yaml configures) has been written by then and says which."""
    if SweepReport.failed:
        sys.exit(1)


def register() -> None:
    """Store the schemas (idempotent: storing again replaces the same entries)."""
    cs = ConfigStore.instance()
    cs.store(name="base_schedule", node=ScheduleConfig)
    cs.store(name="base_quant", node=QuantConfig)
    cs.store(name="base_pruner", node=PrunerConfig)
    cs.store(name="base_distill", node=DistillConfig)
    cs.store(name="base_train", node=TrainRun)
    cs.store(name="base_prune", node=PruneRun)
    cs.store(name="base_fuse", node=FuseRun)


register()


# ---------------------------------------------------------------- deployment (export, calibrate)
@dataclass
class CalibConfig:
    """calib.* of conf/calibrate.yaml: ORT's static calibration."""

    method: str = "minmax"  # minmax | percentile | entropy
    batches: int = 8  # calibration batches of training images
    batch_size: int = 32


@dataclass
class DeployRun:
    """What conf/export.yaml and conf/calibrate.yaml share."""

    dataset: Any = None  # null: the data set the checkpoint was trained on
    model: Any = None  # a plain state_dict as ckpt: the model it holds (model=NAME)
    ckpt: str = MISSING
    format: str = "onnx"  # onnx | openvino | ncnn (calibrate: onnx)
    opset: int = 18  # >= 17; 18 is the dynamo exporter's own
    dynamo: bool = True  # torch.onnx.export(dynamo=...); false: the TorchScript exporter
    latency: bool = True  # time ORT (and PyTorch eager) at batch 1 and 64
    seed: int = 0
    device: str = "cpu"  # ONNX Runtime's CPU provider


@dataclass
class ExportRun(DeployRun):
    """conf/export.yaml."""

    int8: Any = "auto"  # QAT checkpoints: auto | true (integer QDQ model) | false (float graph)
    # batches of 32 training images that set the 8-bit output ranges of the integer layers a QAT
    # model leaves unquantized (ResNet's convs before the residual add); 0: those stay float
    requant_batches: int = 4


@dataclass
class CalibrateRun(DeployRun):
    """conf/calibrate.yaml."""

    calib: CalibConfig = field(default_factory=CalibConfig)


def register_deploy() -> None:
    """Store the export.py / calibrate.py schemas (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_export", node=ExportRun)
    cs.store(name="base_calibrate", node=CalibrateRun)


register_deploy()
