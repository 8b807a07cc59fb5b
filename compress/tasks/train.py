"""The train task: one training run from a plain config dict (no Hydra here).

Writes into the run directory `last.pt`, `best.pt`, TensorBoard events under `tb/` and
`metrics.json`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from compress.checkpoint import load_checkpoint
from compress.cli import write_json
from compress.engine import Callback, TrainConfig, fit
from compress.errors import CheckpointError
from compress.quant import bit_widths, is_quantized, quantize_
from compress.quant.api import applied_label
from compress.quant.api import validate as validate_quant
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import (
    BNSparsity,
    ClipLatentWeights,
    build_model,
    load_data,
    measure_latency,
    model_metrics,
    model_name,
    resolve_device,
)

log = logging.getLogger(__name__)


def run(
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
        model = model_from_checkpoint(
            resume_state, expect=model_name(cfg["model"]), quantized=False
        )
    else:
        model, _ = build_model(cfg, data)
        torch.manual_seed(seed)  # same data/dropout RNG whether or not the model was fresh

    sparsity = dict(cfg.get("sparsity") or {})
    hooks: list[Callback] = []
    if sparsity.get("enabled"):
        hooks.append(BNSparsity(model, float(sparsity.get("s", 1e-4)), data.image_shape))
    if is_quantized(quant_cfg):
        quantize_(model, quant_cfg)
    clip = ClipLatentWeights(model)
    if clip.params:
        hooks.append(clip)
    extra = {"dataset": data.name, "config": cfg}
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
            callbacks=[*hooks, *(callbacks or [])],
            crop_padding=int(cfg["dataset"].get("crop_padding", 4)),
            flip=bool(cfg["dataset"].get("flip", True)),
            writer=writer,
        )
    w_bits, a_bits = bit_widths(model)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "w_bits": w_bits,
        "a_bits": a_bits,
        "test_acc": summary["test_acc"],
        "best_test_acc": summary["best_test_acc"],
        "epochs": summary["epochs"],
        **model_metrics(model, data),
        "latency_ms": measure_latency(model, data),
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
