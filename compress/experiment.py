"""One training run from a plain config dict: the library side of `train.py`.

Takes the composed config as a dict (no Hydra here) and a run directory, and writes into it
`last.pt`, `best.pt`, TensorBoard events under `tb/` and `metrics.json`.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from compress.cli import write_json
from compress.data import DataSet, TensorLoader, load_dataset
from compress.engine import Callback, TrainConfig, evaluate, fit
from compress.errors import CheckpointError, ConfigError, check_choice
from compress.fuse import count_bn, fuse_bn_
from compress.metrics import count_macs, count_params, latency_ms, size_bytes
from compress.models import create_model
from compress.prune import BNSparsity, prunable_units, select_channels, thin
from compress.prune.pruner import validate as validate_pruner
from compress.quant import bit_widths, is_quantized, quant_callbacks, quant_label, quantize_
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
    if cfg.get("refine"):  # the seed project's name for finetuning a pruned model
        if cfg.get("init_from"):
            raise ConfigError("pass init_from=PATH or refine=PATH, not both")
        cfg = {**cfg, "init_from": cfg["refine"]}
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
    shape = data.image_shape
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

    sparsity = dict(cfg.get("sparsity") or {})
    if sparsity.get("enabled"):
        callbacks = [BNSparsity(model, float(sparsity.get("s", 1e-4))), *(callbacks or [])]
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
    w_bits, a_bits = bit_widths(model)
    metrics = {
        "model": model.arch["name"],
        "dataset": data.name,
        "quant": quant_label(quant_cfg),
        "w_bits": w_bits,
        "a_bits": a_bits,
        "test_acc": summary["test_acc"],
        "best_test_acc": summary["best_test_acc"],
        "epochs": summary["epochs"],
        **model_metrics(model, data),
        "latency_ms": latency_ms(model, data.image_shape, batch_size=1, reps=10),
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


def source_dataset_cfg(cfg: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The data set to evaluate on: `dataset=` when given, else the checkpoint's own."""
    if cfg.get("dataset"):
        return dict(cfg["dataset"])
    stored = (state.get("config") or {}).get("dataset")
    if not stored:
        raise ConfigError("the checkpoint does not record its data set: pass dataset=NAME")
    return dict(stored)


def eval_loader(data: DataSet, device: torch.device, batch: int = 500) -> TensorLoader:
    return TensorLoader(data.test, batch, data.mean, data.std, device)


@torch.no_grad()
def logits_on(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        outs.append(model(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)


def source_checkpoint(
    cfg: dict[str, Any], run_dir: str | Path, script: str
) -> tuple[Path, dict[str, Any]]:
    """Create the run directory and load the unfused checkpoint that `ckpt` names."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt") in (None, "", "???"):  # "???": OmegaConf's missing value
        raise ConfigError(f"ckpt is required: python {script} ckpt=RUN/best.pt")
    state = load_checkpoint(cfg["ckpt"])
    if state.get("fused"):
        raise CheckpointError(
            f"{cfg['ckpt']} is already fused: {script} needs a checkpoint "
            "that still has its BN layers"
        )
    return run_dir, state


def run_fuse(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Fold the BNs of checkpoint `cfg["ckpt"]`, prove the result equivalent, save fused.pt."""
    run_dir, state = source_checkpoint(cfg, run_dir, "fuse.py")
    model = model_from_checkpoint(state)
    if count_bn(model) == 0:
        raise CheckpointError(f"{cfg['ckpt']} has no BatchNorm layers to fuse")
    seed = int(cfg.get("seed", 0))
    data = load_data(source_dataset_cfg(cfg, state), seed)
    device = resolve_device(cfg.get("device", "cpu"))
    model.to(device).eval()
    loader = eval_loader(data, device)
    before_logits, labels = logits_on(model, loader)
    before = model_metrics(model, data)
    fused = copy.deepcopy(model)
    plan = fuse_bn_(fused)
    after_logits, _ = logits_on(fused, loader)
    after = model_metrics(fused, data)
    shape = data.image_shape
    lat = {}
    for tag, m in (("before", model), ("after", fused)):
        for bs in (1, 64):
            lat[f"latency_ms_bs{bs}_{tag}"] = latency_ms(m, shape, batch_size=bs, reps=10)
    pred_b, pred_a = before_logits.argmax(1), after_logits.argmax(1)
    metrics = {
        "model": model.arch["name"],
        "dataset": data.name,
        "quant": quant_label(state.get("quant")),
        "images": len(labels),
        "max_abs_diff": (before_logits - after_logits).abs().max().item(),
        "top1_agreement": 100.0 * (pred_b == pred_a).float().mean().item(),
        "test_acc_before": 100.0 * (pred_b == labels).float().mean().item(),
        "test_acc": 100.0 * (pred_a == labels).float().mean().item(),
        "bn_before": count_bn(model),
        "bn_after": count_bn(fused),
        "folds": [[f.conv, f.bn, f.mode] for f in plan.folds],
        "kept_bn": plan.skipped,
        "params_before": before["params"],
        "size_bytes_before": before["size_bytes"],
        **after,
        **lat,
    }
    metrics["best_test_acc"] = metrics["test_acc"]
    save_checkpoint(
        run_dir / "fused.pt",
        {
            "arch": model.arch,
            "model": fused.state_dict(),
            "quant": state.get("quant"),
            "fused": fused.fused,
            "dataset": data.name,
            "config": state.get("config"),
            "test_acc": metrics["test_acc"],
        },
    )
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def fuse_table(m: dict[str, Any]) -> str:
    """The before / after comparison as a small text table."""
    rows = [
        ("test accuracy (%)", f"{m['test_acc_before']:.2f}", f"{m['test_acc']:.2f}"),
        ("BatchNorm layers", m["bn_before"], m["bn_after"]),
        ("params", m["params_before"], m["params"]),
        ("size (bytes)", m["size_bytes_before"], m["size_bytes"]),
        (
            "latency bs=1 (ms)",
            f"{m['latency_ms_bs1_before']:.2f}",
            f"{m['latency_ms_bs1_after']:.2f}",
        ),
        (
            "latency bs=64 (ms)",
            f"{m['latency_ms_bs64_before']:.1f}",
            f"{m['latency_ms_bs64_after']:.1f}",
        ),
    ]
    lines = [f"{'':22s}{'before':>14s}{'after':>14s}"]
    lines += [f"{k:22s}{str(b):>14s}{str(a):>14s}" for k, b, a in rows]
    lines.append(
        f"max |logit diff| {m['max_abs_diff']:.2e} over {m['images']} test images, "
        f"top-1 agreement {m['top1_agreement']:.2f}%"
    )
    return "\n".join(lines)


def run_prune(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Prune checkpoint `cfg["ckpt"]` as `cfg["pruner"]` says; save the thinned `pruned.pt`."""
    p = dict(cfg["pruner"])
    kind = p.get("name", "normal")
    validate_pruner(kind, p.get("percent", 0.5), p.get("base", 1), p.get("min_channels"))
    run_dir, state = source_checkpoint(cfg, run_dir, "prune.py")
    model = model_from_checkpoint(state, quantized=False)
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    device = resolve_device(cfg.get("device", "cpu"))
    keep = select_channels(
        model, kind, p.get("percent", 0.5), p.get("base", 1), p.get("min_channels")
    )
    small = thin(model, keep)
    quant = state.get("quant")
    before, after = model_metrics(model, data), model_metrics(small, data)
    accs = {}
    for tag, m in (("before", model), ("after", small)):
        if quant:
            m = quantize_(copy.deepcopy(m), quant)
        m.to(device)
        accs[tag] = evaluate(m, eval_loader(data, device))["acc"]
    channels_before = [u.channels for u in prunable_units(model)]
    metrics = {
        "model": model.arch["name"],
        "dataset": data.name,
        "pruner": kind,
        "percent": p.get("percent", 0.5),
        "base": p.get("base", 1),
        "channels_before": channels_before,
        "channels": [len(k) for k in keep],
        "test_acc_before": accs["before"],
        "test_acc": accs["after"],
        "best_test_acc": accs["after"],
        "params_before": before["params"],
        "macs_before": before["macs"],
        "size_bytes_before": before["size_bytes"],
        **after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
    }
    save_checkpoint(
        run_dir / "pruned.pt",
        {
            "arch": small.arch,
            "model": small.state_dict(),
            "quant": quant,
            "dataset": data.name,
            "config": state.get("config"),
            "pruned_from": str(cfg["ckpt"]),
            "test_acc": accs["after"],
        },
    )
    write_json(run_dir / "metrics.json", metrics)
    return metrics
