"""The calibrate task: post-training static INT8 of an fp32, pruned or fused checkpoint with
ONNX Runtime. Folds the BNs (exact), exports `model.onnx`, calibrates activation ranges on
`calib.batches` x `calib.batch_size` training images (`calib.method`: minmax, percentile or
entropy), writes `model_int8.onnx` (QDQ: per-channel int8 weights, uint8 activations) and
reports INT8 accuracy beside fp32 on the test set, file sizes and ORT latency (batch 1 and 64,
fp32 against int8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.cli import write_json
from compress.data.coco import CocoDetection, eval_transforms
from compress.deploy.onnx_export import (
    INPUT,
    ExportError,
    accuracy,
    agreement,
    cpu_isa,
    file_size,
    ort_logits,
    session,
)
from compress.deploy.ptq import (
    ImageCalibrationReader,
    calibration_loader,
    qdq_summary,
    quantize_int8,
    validate_calib,
)
from compress.detection.runtime import CoreOutputs, check_exportable, output_keys
from compress.errors import CheckpointError, CompressError
from compress.fuse import count_bn, fuse_bn_
from compress.quant import is_quantized
from compress.quant.api import quant_label
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import eval_loader, is_detection, load_data, source_dataset_cfg
from compress.tasks.export import (
    BATCHES,
    DEFAULT_OPSET,
    check_common,
    detection_checked,
    export_checked,
    export_onnx,
    latencies,
    load_source,
    onnx_exporter,
    ort_core,
)

CALIB_DEFAULTS = {"method": "minmax", "batches": 8, "batch_size": 32}


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    calib = {**CALIB_DEFAULTS, **(cfg.get("calib") or {})}
    validate_calib(calib)
    check_common(cfg)
    run_dir, state = load_source(cfg, run_dir, "calibrate.py")
    if is_quantized(state.get("quant")):
        raise CheckpointError(
            f"calibrate.py takes an fp32, pruned or fused checkpoint; {cfg['ckpt']} was trained "
            f"with quant={quant_label(state['quant'])} (fake-quant): export it with "
            f"python export.py ckpt={cfg['ckpt']}"
        )
    seed = int(cfg.get("seed", 0))
    model = model_from_checkpoint(state).eval()
    bn_folded = 0
    if count_bn(model):
        bn_folded = len(fuse_bn_(model).folds)
    data = load_data(source_dataset_cfg(cfg, state), seed)
    if is_detection(data):
        return run_detection(cfg, run_dir, calib, model, data, bn_folded, state)
    loader = eval_loader(data, torch.device("cpu"))
    fp32_path, int8_path = run_dir / "model.onnx", run_dir / "model_int8.onnx"
    sess32, checked, logits32, labels = export_checked(model, data, loader, fp32_path, cfg)

    reader = ImageCalibrationReader(
        calibration_loader(data, calib["batches"], calib["batch_size"], seed, "calib.batches"),
        sess32.get_inputs()[0].name or INPUT,
        calib["batches"],
    )
    try:
        quantize_int8(fp32_path, int8_path, reader, calib["method"])
    except CompressError:
        raise
    except Exception as e:  # ORT's shape inference and quantizer raise many types: one line
        first, how = (str(e).strip().splitlines() or [""])[0], onnx_exporter(cfg)
        raise ExportError(
            f"ONNX Runtime cannot quantize {arch_name(model.arch)} (ONNX from the "
            f"{how['exporter']} exporter, opset {how['opset']}): {type(e).__name__}: {first[:200]}"
        ) from None
    calibrated = reader.images
    sess8 = session(int8_path)
    logits8, _ = ort_logits(sess8, loader)
    vs_fp32 = agreement(logits32, logits8)
    qdq = qdq_summary(int8_path)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "fused": bool(state.get("fused")) or bn_folded > 0,
        "bn_folded": bn_folded,
        "pruned": bool(state.get("widths")),
        "format": "onnx",
        "calib_method": calib["method"],
        "calib_batches": calib["batches"],
        "calib_batch_size": calib["batch_size"],
        "calib_images": calibrated,
        "images": len(labels),
        **checked,  # max_abs_diff / top1_agreement: ORT fp32 against PyTorch
        "test_acc_int8": accuracy(logits8, labels),
        "int8_max_abs_diff": vs_fp32["max_abs_diff"],
        "int8_top1_agreement": vs_fp32["top1_agreement"],
        "int8_bytes": file_size(int8_path),
        "quantize_linear": qdq["quantize_linear"],
        "dequantize_linear": qdq["dequantize_linear"],
        "int8_weights": qdq["int8_weights"],
        "per_channel_weights": qdq["per_channel_weights"],
        **cpu_isa(),
    }
    sizes_and_speed(metrics, cfg, {"fp32": sess32, "int8": sess8}, data.image_shape, model)
    metrics["test_acc"] = metrics["best_test_acc"] = metrics["test_acc_int8"]
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def sizes_and_speed(
    metrics: dict[str, Any],
    cfg: dict[str, Any],
    sessions: dict[str, Any],
    image_shape: tuple[int, ...],
    model: torch.nn.Module,
) -> None:
    """fp32 / int8 file size ratio and, unless latency=false, the latencies and speed-ups."""
    metrics["size_ratio"] = metrics["onnx_bytes"] / metrics["int8_bytes"]
    if cfg.get("latency", True):
        metrics.update(latencies(sessions, image_shape, model))
        for b in BATCHES:
            metrics[f"speedup_bs{b}"] = (
                metrics[f"latency_ms_bs{b}_fp32"] / metrics[f"latency_ms_bs{b}_int8"]
            )


def table(m: dict[str, Any]) -> str:
    if "map_int8" in m:
        return detection_table(m)
    rows = [
        ("test accuracy (%)", f"{m['test_acc_fp32']:.2f}", f"{m['test_acc_int8']:.2f}", ""),
        ("file size (bytes)", m["onnx_bytes"], m["int8_bytes"], f"{m['size_ratio']:.2f}x"),
    ]
    for b in BATCHES if "latency_ms_bs1_int8" in m else ():
        f, i = m[f"latency_ms_bs{b}_fp32"], m[f"latency_ms_bs{b}_int8"]
        rows.append((f"ORT latency bs={b} (ms)", f"{f:.2f}", f"{i:.2f}", f"{f / i:.2f}x"))
    lines = [
        f"{m['model']}: static INT8 (QDQ, per-channel int8 weights, uint8 activations), "
        f"{m['calib_method']} calibration on {m['calib_images']} training images",
        f"{'':24s}{'fp32':>12s}{'int8':>12s}{'ratio':>10s}",
    ]
    lines += [f"{k:24s}{str(a):>12s}{str(b):>12s}{str(c):>10s}" for k, a, b, c in rows]
    lines.append(
        f"INT8 vs fp32: top-1 agreement {m['int8_top1_agreement']:.2f}%, max |logit diff| "
        f"{m['int8_max_abs_diff']:.3f}; ORT fp32 vs PyTorch: {m['max_abs_diff']:.2e}, "
        f"{m['top1_agreement']:.2f}%"
    )
    lines.append(f"CPU: {m['cpu']} (int8 ISA: {m['isa']})")
    return "\n".join(lines)


def run_detection(
    cfg: dict[str, Any],
    run_dir: Path,
    calib: dict[str, Any],
    model: torch.nn.Module,
    data: Any,
    bn_folded: int,
    state: dict[str, Any],
) -> dict[str, Any]:
    """A detector: its core (BNs folded) as model.onnx, calibrated by ORT on training images
    as the detector's transform makes them (no augmentation), model_int8.onnx run with the
    detector's decoding and NMS in Python; both files checked on the val set."""
    name = f"{arch_name(model.arch)} ({cfg.get('ckpt')})"
    check_exportable(model, name)
    keys = output_keys(model, data.image_size)
    core = CoreOutputs(model, keys).eval()
    opset, dynamo = int(cfg.get("opset", DEFAULT_OPSET)), bool(cfg.get("dynamo", True))
    fp32_path, int8_path = run_dir / "model.onnx", run_dir / "model_int8.onnx"
    export_onnx(core, fp32_path, data.image_shape, opset, dynamo, name)
    sess32 = session(fp32_path)
    plain = CocoDetection(data.train.root, "train", eval_transforms(data.image_size))
    n = min(calib["batches"] * calib["batch_size"], len(plain))
    with torch.no_grad():
        images = [plain[i][0] for i in range(n)]
        x = model.transform(images)[0].tensors
    batches = [(b, None) for b in x.split(calib["batch_size"])]
    reader = ImageCalibrationReader(batches, sess32.get_inputs()[0].name or INPUT)
    quantize_int8(fp32_path, int8_path, reader, calib["method"])
    sess8 = session(int8_path)
    fp32, int8 = (
        detection_checked(model, core, ort_core(sess32), data),
        detection_checked(model, core, ort_core(sess8), data),
    )
    qdq = qdq_summary(int8_path)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "fused": bool(state.get("fused")) or bn_folded > 0,
        "bn_folded": bn_folded,
        "pruned": bool(state.get("widths")),
        "format": "onnx",
        **onnx_exporter(cfg),
        "exported": "core (raw head outputs); decoding and NMS in Python",
        "calib_method": calib["method"],
        "calib_images": reader.images,
        "images": fp32["images"],
        "map_torch": fp32["map_torch"],
        "map_fp32": fp32["map_runtime"],
        "map_int8": int8["map_runtime"],
        "max_rel_diff": fp32["max_rel_diff"],  # ORT fp32 against PyTorch
        "int8_max_rel_diff": int8["max_rel_diff"],
        "int8_images_same_detections": int8["images_same_detections"],
        "onnx_bytes": file_size(fp32_path),
        "int8_bytes": file_size(int8_path),
        "quantize_linear": qdq["quantize_linear"],
        "int8_weights": qdq["int8_weights"],
        **cpu_isa(),
    }
    sizes_and_speed(metrics, cfg, {"fp32": sess32, "int8": sess8}, data.image_shape, core)
    metrics["map"] = metrics["best_map"] = metrics["map_int8"]
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def detection_table(m: dict[str, Any]) -> str:
    lines = [
        f"{m['model']}: the core as static INT8 (QDQ), {m['calib_method']} calibration on "
        f"{m['calib_images']} training images; decoding and NMS in Python",
        f"test mAP: PyTorch {m['map_torch']:.2f}, ORT fp32 {m['map_fp32']:.2f}, "
        f"ORT int8 {m['map_int8']:.2f}",
        f"file size: fp32 {m['onnx_bytes']} bytes, int8 {m['int8_bytes']} bytes "
        f"({m['size_ratio']:.2f}x)",
        f"int8 raw outputs: max |diff| {m['int8_max_rel_diff']:.3f} of the largest; "
        f"{m['int8_images_same_detections']} of {m['images']} images with fp32's detections",
    ]
    for b in BATCHES if "latency_ms_bs1_int8" in m else ():
        f, i = m[f"latency_ms_bs{b}_fp32"], m[f"latency_ms_bs{b}_int8"]
        lines.append(f"ORT core latency bs={b}: fp32 {f:.2f} ms, int8 {i:.2f} ms ({f / i:.2f}x)")
    lines.append(f"CPU: {m['cpu']} (int8 ISA: {m['isa']})")
    return "\n".join(lines)
