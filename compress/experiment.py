"""One training run from a plain config dict: the library side of `train.py`.

Takes the composed config as a dict (no Hydra here) and a run directory, and writes into it
`last.pt`, `best.pt`, TensorBoard events under `tb/` and `metrics.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import load_checkpoint, model_from_checkpoint
from compress.cli import write_json
from compress.data import DataSet, load_dataset
from compress.engine import Callback, TrainConfig, fit
from compress.errors import CheckpointError, ConfigError, check_choice
from compress.metrics import count_macs, count_params, size_bytes
from compress.models import create_model
from compress.quant import bit_widths, is_quantized, quant_callbacks, quantize_
from compress.quant.api import validate as validate_quant

log = logging.getLogger(__name__)

AUGMENT_KEYS = ("crop_padding", "flip")


def resolve_device(name: str) -> torch.device:
    check_choice("device", name, ("auto", "cpu", "cuda"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available: use device=cpu")
    return torch.device(name)


def load_data(dataset_cfg: dict[str, Any], seed: int) -> DataSet:
    kw = {k: v for k, v in dataset_cfg.items() if k not in AUGMENT_KEYS}
    return load_dataset(seed=seed, **kw)


def build_model(cfg: dict[str, Any], data: DataSet) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model to train: fresh from `model`, or rebuilt from `init_from` (channel spec kept).

    Returns the model and the checkpoint it came from (None when fresh).
    """
    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    if not cfg.get("init_from"):
        model = create_model(
            name, num_classes=data.num_classes, in_channels=data.in_channels, **model_cfg
        )
        return model, None
    path = Path(cfg["init_from"])
    try:
        state = load_checkpoint(path)
        model = model_from_checkpoint(state, expect=name, quantized=False)
    except CheckpointError as e:
        raise CheckpointError(f"init_from={path}: {e}") from None
    arch = model.arch
    if (arch["num_classes"], arch["in_channels"]) != (data.num_classes, data.in_channels):
        raise CheckpointError(
            f"init_from={path}: the model was built for {arch['num_classes']} classes and "
            f"{arch['in_channels']} input channels, but dataset={data.name} has "
            f"{data.num_classes} and {data.in_channels}"
        )
    return model, state


def model_metrics(model: nn.Module, data: DataSet) -> dict[str, int]:
    shape = tuple(data.test.images.shape[1:])
    return {
        "params": count_params(model),
        "macs": count_macs(model, shape),
        "size_bytes": size_bytes(model),
    }


def run_training(
    cfg: dict[str, Any], run_dir: str | Path, callbacks: list[Callback] | None = None
) -> dict[str, Any]:
    """Train as `cfg` says and write the run's files; returns the metrics written."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    sched = TrainConfig.from_dict({k: v for k, v in cfg["schedule"].items() if k != "stages"})
    device = resolve_device(cfg.get("device", "auto"))
    quant_cfg = dict(cfg.get("quant") or {})
    validate_quant(quant_cfg)
    torch.manual_seed(seed)
    data = load_data(dict(cfg["dataset"]), seed)
    log.info(
        "data %s: %d train / %d test images, %d classes",
        data.name,
        len(data.train),
        len(data.test),
        data.num_classes,
    )

    resume_state = None
    if cfg.get("resume"):
        last = run_dir / "last.pt"
        if not last.exists():
            raise CheckpointError(
                f"resume=true but {last} does not exist: point hydra.run.dir at the run to continue"
            )
        resume_state = load_checkpoint(last)
        model = model_from_checkpoint(resume_state, expect=cfg["model"]["name"], quantized=False)
    else:
        model, _ = build_model(cfg, data)
        torch.manual_seed(seed)  # same data/dropout RNG whether or not the model was fresh

    if is_quantized(quant_cfg):
        quantize_(model, quant_cfg)
    callbacks = [*quant_callbacks(model), *(callbacks or [])]
    extra = {
        "dataset": data.name,
        "config": cfg,
        "quant": quant_cfg if is_quantized(quant_cfg) else None,
    }
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(
        str(run_dir / "tb"), purge_step=resume_state["epoch"] + 1 if resume_state else None
    ) as writer:
        summary = fit(
            model,
            data,
            sched,
            run_dir,
            device,
            seed=seed,
            resume_state=resume_state,
            extra_state=extra,
            callbacks=callbacks,
            crop_padding=int(cfg["dataset"].get("crop_padding", 4)),
            flip=bool(cfg["dataset"].get("flip", True)),
            writer=writer,
        )
    metrics = {
        "model": model.arch["name"],
        "dataset": data.name,
        "quant": quant_cfg.get("name", "fp32"),
        "w_bits": bit_widths(model)[0],
        "a_bits": bit_widths(model)[1],
        "test_acc": summary["test_acc"],
        "best_test_acc": summary["best_test_acc"],
        "epochs": summary["epochs"],
        **model_metrics(model, data),
        "wall_s": summary["wall_s"],
        "run_wall_s": time.perf_counter() - t_start,
        "history": summary["history"],
    }
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "test accuracy %.2f%% (best %.2f%%) after %d epochs; %d params, %.1f MMACs, %.1f KB",
        metrics["test_acc"],
        metrics["best_test_acc"],
        metrics["epochs"],
        metrics["params"],
        metrics["macs"] / 1e6,
        metrics["size_bytes"] / 1024,
    )
    return metrics
