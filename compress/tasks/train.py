"""The train task: one training run from a plain config dict (no Hydra here).

Writes into the run directory `last.pt`, `best.pt`, TensorBoard events under `tb/` and
`metrics.json`. Under torchrun (compress.distributed) every process trains its shard of the
data and rank 0 alone writes these files; the other ranks create nothing in the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from compress.checkpoint import load_checkpoint
from compress.cli import write_json
from compress.config import validate_distill
from compress.distill import Distiller, cross_entropy_loss
from compress.distributed import Dist, check_resume_world, init_from_env
from compress.engine import Callback, TrainConfig, fit
from compress.errors import CheckpointError
from compress.quant import bit_widths, is_quantized, quantize_
from compress.quant.api import applied_label
from compress.quant.api import validate as validate_quant
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import (
    BNSparsity,
    ClipLatentWeights,
    FreezeBN,
    build_model,
    build_teacher,
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
    """Train as `cfg` says and write the run's files; returns the metrics written.

    Under torchrun this joins the process group (unless the caller already has) and leaves it
    again at the end when it joined it here.
    """
    device = resolve_device(cfg.get("device", "auto"))
    owned = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist = init_from_env(device)
    try:
        return _run(cfg, Path(run_dir), callbacks, device, dist)
    finally:
        if owned:
            dist.shutdown()


def _run(
    cfg: dict[str, Any],
    run_dir: Path,
    callbacks: list[Callback] | None,
    device: torch.device,
    dist: Dist,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed = int(cfg.get("seed", 0))
    sched = TrainConfig.from_dict({k: v for k, v in cfg["schedule"].items() if k != "stages"})
    quant_cfg = dict(cfg.get("quant") or {})
    validate_quant(quant_cfg)
    distill_cfg = dict(cfg.get("distill") or {})
    distilled = validate_distill(distill_cfg) == "kd"
    torch.manual_seed(seed)
    data = load_data(dict(cfg["dataset"]), seed)
    if dist.is_main:
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
        check_resume_world(resume_state.get("world_size", 1), dist.world, last)
        model = model_from_checkpoint(
            resume_state, expect=model_name(cfg["model"]), quantized=False
        )
        init = resume_state.get("init") or {}
    else:
        model, _ = build_model(cfg, data)
        init = _init_record(model)
    loss_fn = None
    if distilled:  # before quantize_: `self` is the model as it starts, uncompressed
        teacher = build_teacher(cfg, data, model, resumed=resume_state is not None)
        loss_fn = Distiller(
            teacher,
            cross_entropy_loss(sched.label_smoothing),
            float(distill_cfg.get("temperature", 4.0)),
            float(distill_cfg.get("alpha", 0.9)),
        )
        if dist.is_main:
            log.info(
                "distilling from %s (T=%g, alpha=%g)",
                distill_cfg.get("teacher", "self"),
                loss_fn.temperature,
                loss_fn.alpha,
            )
    torch.manual_seed(seed)  # same data/dropout RNG whether or not the model was fresh

    sparsity = dict(cfg.get("sparsity") or {})
    hooks: list[Callback] = []
    if sparsity.get("enabled"):
        hooks.append(BNSparsity(model, float(sparsity.get("s", 1e-4)), data.image_shape))
    if is_quantized(quant_cfg):
        quantize_(model, quant_cfg)
    if quant_cfg.get("freeze_bn_epoch"):
        done = resume_state["epoch"] if resume_state else 0
        hooks.append(FreezeBN(model, int(quant_cfg["freeze_bn_epoch"]), done))
    clip = ClipLatentWeights(model)
    if clip.params:
        hooks.append(clip)
    extra = {"dataset": data.name, "config": cfg, "init": init}
    # rank 0 writes TensorBoard; the other ranks a null writer (no tb/ folder of theirs)
    tb = (
        SummaryWriter(
            str(run_dir / "tb"), purge_step=resume_state["epoch"] + 1 if resume_state else None
        )
        if dist.is_main
        else contextlib.nullcontext(None)
    )
    with tb as writer:
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
            dist=dist,
            loss_fn=loss_fn,
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
    }
    if init:
        metrics["init"] = init
    if distilled:
        metrics["distill"] = {
            "teacher": str(distill_cfg.get("teacher", "self")),
            "temperature": loss_fn.temperature,
            "alpha": loss_fn.alpha,
        }
    if dist.enabled:
        metrics["world_size"] = dist.world
    if not dist.is_main:  # the same numbers; the files and the model measurements are rank 0's
        dist.barrier()
        return {**metrics, "wall_s": summary["wall_s"], "history": summary["history"]}
    metrics = {
        **metrics,
        **model_metrics(model, data),
        "latency_ms": measure_latency(model, data),
        # size_bytes is computed at the quantized widths; a fake-quant checkpoint is fp32 on disk
        # (pack.py / export.py write the small files)
        "size_bytes_ckpt_file": _file_size(run_dir / "best.pt"),
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
    dist.barrier()  # metrics.json is written when any rank returns
    return metrics


def _init_record(model: torch.nn.Module) -> dict[str, Any]:
    """Where the starting weights came from (a state_dict file, torchvision's weights) and
    whether the classifier head was replaced (transfer learning), for metrics.json."""
    record = dict(getattr(model, "init_source", None) or {})
    transfer = getattr(model, "transfer", None)
    if transfer:
        record["new_head"] = transfer
    return record


def _file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
