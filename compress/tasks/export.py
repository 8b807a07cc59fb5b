"""The export task: write checkpoint `cfg["ckpt"]` (float, pruned, fused, or fake-quant) as
`model.onnx` and prove it in ONNX Runtime: max |logit diff| and top-1 agreement with PyTorch on
the test set, accuracy, file size, latency at batch 1 and 64 against PyTorch eager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.checkpoint import load_checkpoint
from compress.cli import write_json
from compress.deploy.onnx_export import (
    DEFAULT_OPSET,
    accuracy,
    agreement,
    check_format,
    cpu_isa,
    export_onnx,
    exporter_name,
    file_size,
    ort_latency_ms,
    ort_logits,
    require,
    session,
)
from compress.errors import ConfigError, check_choice
from compress.metrics import latency_ms
from compress.quant.api import applied_label
from compress.spec import arch_name, model_from_checkpoint
from compress.tasks.common import eval_loader, load_data, logits_on, source_dataset_cfg

BATCHES = (1, 64)


def check_common(cfg: dict[str, Any]) -> None:
    """The checks both deploy tasks make before loading anything: format, device, runtime."""
    check_format(cfg.get("format", "onnx"))
    check_choice("device", cfg.get("device", "cpu"), ("cpu",))
    require("onnxruntime")
    require("onnx")
    if cfg.get("dynamo", True):
        require("onnxscript")


def load_source(cfg: dict[str, Any], run_dir: str | Path, script: str) -> tuple[Path, dict]:
    """Create the run directory and load the checkpoint `ckpt` names (fused ones too)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("ckpt") in (None, "", "???"):
        raise ConfigError(f"ckpt is required: python {script} ckpt=RUN/best.pt")
    return run_dir, load_checkpoint(cfg["ckpt"])


def latencies(
    sessions: dict[str, Any], image_shape: tuple[int, ...], model: torch.nn.Module | None = None
) -> dict[str, float]:
    """Median ms per run at batch 1 and 64: `latency_ms_bs{b}_{tag}` for each ORT session and
    `..._torch` for PyTorch eager when `model` is given."""
    out = {}
    for b in BATCHES:
        reps = 20 if b == 1 else 5
        if model is not None:
            out[f"latency_ms_bs{b}_torch"] = latency_ms(model, image_shape, b, reps)
        for tag, sess in sessions.items():
            out[f"latency_ms_bs{b}_{tag}"] = ort_latency_ms(sess, image_shape, b, reps)
    return out


def export_checked(
    model: torch.nn.Module, data: Any, loader: Any, path: Path, cfg: dict[str, Any]
) -> tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]:
    """Export `model` to `path`, run it in ORT over `loader` and compare with PyTorch.

    Returns the session, the metrics, ORT's logits and the labels."""
    model.cpu().eval()
    torch_logits, labels = logits_on(model, loader)
    export_onnx(
        model,
        path,
        data.image_shape,
        opset=int(cfg.get("opset", DEFAULT_OPSET)),
        dynamo=bool(cfg.get("dynamo", True)),
        name=f"{arch_name(model.arch)} ({cfg.get('ckpt')})",
    )
    sess = session(path)
    onnx_logits, _ = ort_logits(sess, loader)
    metrics = {
        **agreement(torch_logits, onnx_logits),
        "test_acc_torch": accuracy(torch_logits, labels),
        "test_acc_fp32": accuracy(onnx_logits, labels),
        "onnx_bytes": file_size(path),
    }
    return sess, metrics, onnx_logits, labels


def run(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    check_common(cfg)
    run_dir, state = load_source(cfg, run_dir, "export.py")
    model = model_from_checkpoint(state)
    data = load_data(source_dataset_cfg(cfg, state), int(cfg.get("seed", 0)))
    loader = eval_loader(data, torch.device("cpu"))
    sess, checked, _, labels = export_checked(model, data, loader, run_dir / "model.onnx", cfg)
    metrics = {
        "model": arch_name(model.arch),
        "dataset": data.name,
        "quant": applied_label(model),
        "fused": bool(state.get("fused")),
        "pruned": bool(state.get("widths")),
        "format": "onnx",
        "opset": int(cfg.get("opset", DEFAULT_OPSET)),
        "exporter": exporter_name(int(cfg.get("opset", DEFAULT_OPSET)), cfg.get("dynamo", True)),
        "images": len(labels),
        **checked,
        **cpu_isa(),
    }
    if cfg.get("latency", True):
        metrics.update(latencies({"fp32": sess}, data.image_shape, model))
        for b in BATCHES:
            metrics[f"speedup_bs{b}_ort_vs_torch"] = (
                metrics[f"latency_ms_bs{b}_torch"] / metrics[f"latency_ms_bs{b}_fp32"]
            )
    metrics["test_acc"] = metrics["best_test_acc"] = metrics["test_acc_fp32"]
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def table(m: dict[str, Any]) -> str:
    lines = [
        f"{m['model']} ({m['quant']}) -> ONNX opset {m['opset']} ({m['exporter']} exporter), "
        f"{m['onnx_bytes']} bytes",
        f"max |logit diff| ORT vs PyTorch {m['max_abs_diff']:.2e} over {m['images']} test "
        f"images, top-1 agreement {m['top1_agreement']:.2f}%",
        f"test accuracy: PyTorch {m['test_acc_torch']:.2f}%, ORT {m['test_acc_fp32']:.2f}%",
    ]
    if "latency_ms_bs1_fp32" in m:
        lines.append(f"{'':22s}{'PyTorch ms':>12s}{'ORT ms':>10s}{'speed-up':>10s}")
    for b in BATCHES if "latency_ms_bs1_fp32" in m else ():
        t, o = m[f"latency_ms_bs{b}_torch"], m[f"latency_ms_bs{b}_fp32"]
        lines.append(f"{f'latency bs={b}':22s}{t:>12.2f}{o:>10.2f}{t / o:>9.2f}x")
    lines.append(f"CPU: {m['cpu']} (int8 ISA: {m['isa']})")
    return "\n".join(lines)
