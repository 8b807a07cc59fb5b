"""The fuse task: fold the BNs of checkpoint `cfg["ckpt"]`, prove the result equivalent on the
test set (max |logit diff|, top-1 agreement), save `fused.pt`.

Exact folding (`fuse_bn_(exact=True)`): a quantized model keeps every rounding it makes, the
BNs after its quantized layers becoming per-channel output scales (compress.fuse), so its
fused form computes bit for bit what it did; a float model folds into the weights."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.checkpoint import save_checkpoint
from compress.cli import write_json
from compress.detection.models import core_of
from compress.errors import CheckpointError
from compress.fuse import MODES, count_bn, fuse_bn_
from compress.metrics import latency_ms
from compress.quant.api import applied_label
from compress.spec import arch_name, checkpoint_state, model_from_checkpoint
from compress.tasks.common import (
    eval_loader,
    is_detection,
    load_data,
    logits_on,
    model_metrics,
    resolve_device,
    source_checkpoint,
    source_dataset_cfg,
    task_for,
)

log = logging.getLogger(__name__)
REL_TOL = 1e-4  # max |logit diff| / max |logit| above which the fusion is reported as inexact


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    run_dir, state = source_checkpoint(cfg, run_dir, "fuse.py")
    model = model_from_checkpoint(state)
    if count_bn(model) == 0:
        raise CheckpointError(f"{cfg['ckpt']} has no BatchNorm layers to fuse")
    seed = int(cfg.get("seed", 0))
    data = load_data(source_dataset_cfg(cfg, state), seed)
    device = resolve_device(cfg.get("device", "cpu"))
    model.to(device).eval()
    detection = is_detection(data)
    loader = eval_loader(data, device)
    before_logits, labels = (core_outputs if detection else logits_on)(model, loader)
    before = model_metrics(model, data)
    fused = copy.deepcopy(model)
    plan = fuse_bn_(fused, exact=True)
    after_logits, _ = (core_outputs if detection else logits_on)(fused, loader)
    after = model_metrics(fused, data)
    lat = {}
    if cfg.get("latency", True):  # a pipeline stage or a test may leave the timing out
        for tag, m in (("before", model), ("after", fused)):
            for bs in (1, 64):
                lat[f"latency_ms_bs{bs}_{tag}"] = latency_ms(
                    m, data.image_shape, batch_size=bs, reps=10
                )
    diff = (before_logits - after_logits).abs().max().item()
    scale = before_logits.abs().max().item()
    if detection:  # the heads' raw outputs compared; mAP of the whole detector before / after
        task = task_for(data)
        scores = {"map_before": task.evaluate(model, loader)["map"]}
        scores["map"] = scores["best_map"] = task.evaluate(fused, loader)["map"]
        images = sum(len(images) for images, _ in loader)
    else:
        pred_b, pred_a = before_logits.argmax(1), after_logits.argmax(1)
        scores = {
            "top1_agreement": 100.0 * (pred_b == pred_a).float().mean().item(),
            "test_acc_before": 100.0 * (pred_b == labels).float().mean().item(),
            "test_acc": 100.0 * (pred_a == labels).float().mean().item(),
        }
        scores["best_test_acc"] = scores["test_acc"]
        images = len(labels)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "images": images,
        "max_abs_diff": diff,
        "max_rel_diff": diff / scale if scale > 0 else diff,
        **scores,
        "bn_before": count_bn(model),
        "bn_after": count_bn(fused),
        "folds": [[f.conv, f.bn, f.mode] for f in plan.folds],
        "fold_modes": {mode: sum(f.mode == mode for f in plan.folds) for mode in MODES},
        "kept_bn": plan.skipped,
        "params_before": before["params"],
        "size_bytes_before": before["size_bytes"],
        **after,
        **lat,
    }
    if metrics["max_rel_diff"] > REL_TOL or metrics.get("top1_agreement", 100.0) < 100.0:
        log.warning(
            "fuse: the fused model is not exact: max |output diff| %.3g (%.3g of the largest), "
            "top-1 agreement %s",
            diff,
            metrics["max_rel_diff"],
            f"{metrics['top1_agreement']:.2f}%" if "top1_agreement" in metrics else "n/a",
        )
    save_checkpoint(
        run_dir / "fused.pt",
        checkpoint_state(
            fused,
            dataset=data.name,
            config=state.get("config"),
            **({"test_map": metrics["map"]} if detection else {"test_acc": metrics["test_acc"]}),
        ),
    )
    write_json(run_dir / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def core_outputs(model: nn.Module, loader: Iterable[Any]) -> tuple[torch.Tensor, None]:
    """A detector's raw head outputs (its core's, on the images its transform makes of the
    test set), flattened into one vector: what fusion must leave unchanged."""
    model.eval()
    core, outs = core_of(model), []
    for images, _ in loader:
        x = model.transform(images)[0].tensors
        out = core(x)
        parts = out.values() if isinstance(out, dict) else out
        outs += [t.flatten().float().cpu() for t in parts]
    return torch.cat(outs), None


def table(m: dict[str, Any]) -> str:
    """The before / after comparison as a small text table."""
    score = ("test mAP", f"{m.get('map_before', 0):.2f}", f"{m.get('map', 0):.2f}")
    if "test_acc" in m:
        score = ("test accuracy (%)", f"{m['test_acc_before']:.2f}", f"{m['test_acc']:.2f}")
    rows = [
        score,
        ("BatchNorm layers", m["bn_before"], m["bn_after"]),
        ("params", m["params_before"], m["params"]),
        ("size (bytes)", m["size_bytes_before"], m["size_bytes"]),
    ]
    if "latency_ms_bs1_before" in m:
        for bs, digits in ((1, 2), (64, 1)):
            before, after = m[f"latency_ms_bs{bs}_before"], m[f"latency_ms_bs{bs}_after"]
            rows.append((f"latency bs={bs} (ms)", f"{before:.{digits}f}", f"{after:.{digits}f}"))
    lines = [f"{'':22s}{'before':>14s}{'after':>14s}"]
    lines += [f"{k:22s}{str(b):>14s}{str(a):>14s}" for k, b, a in rows]
    lines.append(agreement_line(m))
    modes = m.get("fold_modes") or {}
    if modes.get("scale") or modes.get("latent"):
        lines.append(
            f"folds: {modes.get('normal', 0) + modes.get('bias', 0)} into the weights, "
            f"{modes.get('scale', 0)} as per-channel output scales after the layer (quantized "
            f"weights kept), {modes.get('latent', 0)} into int8 latent weights"
        )
    return "\n".join(lines)


def agreement_line(m: dict[str, Any]) -> str:
    """Max |logit diff| and top-1 agreement of the fused model against the unfused one."""
    if "top1_agreement" not in m:  # a detector: its heads' raw outputs
        return f"max |output diff| {m['max_abs_diff']:.2e} over {m['images']} test images"
    return (
        f"max |logit diff| {m['max_abs_diff']:.2e} over {m['images']} test images, "
        f"top-1 agreement {m['top1_agreement']:.2f}%"
    )
