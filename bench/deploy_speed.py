"""CPU inference latency: PyTorch eager fp32 against ONNX Runtime fp32, ORT static INT8 (PTQ:
QDQ, per-channel int8 weights, uint8 activations), the integer model of a QAT network (w4a4p:
DoReFa 4-bit weights, PACT 4-bit activations, exported with its quantizers as Q / DQ), and the
binary path (wbab in bacp order: the fake-quant model, its bit-packed XNOR-popcount convs in
PyTorch, and its integer QDQ model in ORT); BN-fused models, markdown tables.

python bench/deploy_speed.py [--models nin,nin_gc,resnet20] [--batch 1,64] [--method minmax]

Random weights are fine for speed, once the BN statistics are set on random N(0, 1) batches
(with the init's statistics NIN's activations decay into denormals, which slows PyTorch ~10x
and measures nothing real); INT8 is calibrated on such batches too (the ranges only move the
scales, not the work). Each cell is the best of 3 interleaved rounds of median
latencies, so drift of a shared machine hits every column alike.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress.deploy import (
    ArrayCalibrationReader,
    cpu_isa,
    export_onnx,
    ort_latency_ms,
    quantize_int8,
    require,
    session,
    xnor,
)
from compress.deploy.onnx_export import INTEGER_KERNELS, ort_kernels
from compress.deploy.qdq import to_qdq
from compress.fuse import fuse_bn_
from compress.metrics import latency_ms
from compress.models import create_model
from compress.quant import quantize_

W4A4P = {"weight": {"kind": "dorefa", "bits": 4}, "act": {"kind": "pact", "bits": 4}}
WBAB = {"weight": {"kind": "binary"}, "act": {"kind": "binary"}}

SHAPE = (3, 32, 32)


@torch.no_grad()
def set_bn_stats_(model: torch.nn.Module, batches: list[np.ndarray]) -> None:
    """Running BN statistics of `batches` (cumulative averages), so activations have unit scale."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x in batches:
        model(torch.from_numpy(x))
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nin,nin_gc,resnet20")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--calib-batches", type=int, default=4)
    args = ap.parse_args()
    ort = require("onnxruntime")
    batches = [int(b) for b in args.batch.split(",")]
    isa = cpu_isa()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{ort.__version__}; CPU: {isa['cpu']}; int8 ISA: {isa['isa']} "
        f"(flags: {' '.join(isa['cpu_flags']) or 'none'})\n"
    )
    ov = openvino_or_none()
    runtimes = ["ORT"] + (["OV"] if ov is not None else [])
    cols = ["torch fp32"] + [f"{r} {v}" for r in runtimes for v in ("fp32", "int8 PTQ", "int8 QAT")]
    print("Milliseconds per batch (best of 3 interleaved rounds of medians):\n")
    print("| model | batch | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((32, *SHAPE), dtype=np.float32) for _ in range(args.calib_batches)]
    ratios: list[str] = []
    kernels: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create_model(name)
            set_bn_stats_(model, calib)
            fuse_bn_(model)
            fp32 = export_onnx(model, Path(tmp) / f"{name}.onnx", SHAPE, name=name)
            int8 = quantize_int8(
                fp32,
                Path(tmp) / f"{name}_int8.onnx",
                ArrayCalibrationReader(calib, "input"),
                args.method,
            )
            qat = qat_model(name, W4A4P, calib)
            ranges = [torch.from_numpy(c) for c in calib]  # for the convs before an add
            qat_path = export_onnx(to_qdq(qat, ranges)[0], Path(tmp) / f"{name}_qat.onnx", SHAPE)
            paths = (fp32, int8, qat_path)
            loaded = [(ort_latency_ms, session(p)) for p in paths]
            kernels[name] = f"ORT {integer_kernels(int8)} / {integer_kernels(qat_path)}"
            if ov is not None:
                compiled = [
                    ov.compile_cpu(ov.export_openvino(p, p.with_suffix(".xml"))) for p in paths
                ]
                loaded += [(ov.ov_latency_ms, c) for c in compiled]
                layers = [ov.int8_layers(c).get("int8", 0) for c in compiled[1:]]
                kernels[name] += f", OpenVINO {layers[0]} / {layers[1]}"
            for b in batches:
                reps = args.reps if b == 1 else max(3, args.reps // 4)
                timers = [partial(latency_ms, model, SHAPE, b, reps)]
                timers += [partial(timer, sess, SHAPE, b, reps) for timer, sess in loaded]
                ms = best_of(3, timers)
                print(f"| {name} | {b} | " + " | ".join(f"{v:.2f}" for v in ms) + " |", flush=True)
                torch_ms, per_runtime = (
                    ms[0],
                    [ms[1 + 3 * i : 4 + 3 * i] for i in range(len(runtimes))],
                )
                cells = []
                for f, p, q in per_runtime:
                    cells += [f"{f / p:.2f}x", f"{f / q:.2f}x"]
                for _, p, q in per_runtime:
                    cells += [f"{torch_ms / p:.2f}x", f"{torch_ms / q:.2f}x"]
                ratios.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
        head = [f"{r} {v} vs {r} fp32" for r in runtimes for v in ("PTQ", "QAT")]
        head += [f"{r} {v} vs torch" for r in runtimes for v in ("PTQ", "QAT")]
        print("\nINT8 speed-ups (the same runtime's fp32; PyTorch eager fp32):\n")
        print("| model | batch | " + " | ".join(head) + " |")
        print("|---|---:|" + "---:|" * len(head))
        print("\n".join(ratios))
        print(
            "\ninteger kernels (convs, adds, matmuls; PTQ / QAT): "
            + "; ".join(f"{n}: {k}" for n, k in kernels.items())
        )
        binary_table(args, batches, calib, Path(tmp))


def openvino_or_none() -> Any:
    """compress.deploy.openvino_export when OpenVINO is installed (its columns), else None."""
    try:
        require("openvino")
    except Exception:
        return None
    from compress.deploy import openvino_export

    return openvino_export


def best_of(rounds: int, timers: list[Callable[[], float]]) -> list[float]:
    """Each timer's best over `rounds` interleaved rounds (drift hits every column alike)."""
    runs = [[t() for t in timers] for _ in range(rounds)]
    return [min(col) for col in zip(*runs, strict=True)]


def integer_kernels(path: Path) -> int:
    return sum(n for op, n in ort_kernels(path).items() if op in INTEGER_KERNELS)


def qat_model(name: str, quant: dict, calib: list[np.ndarray], **kw) -> torch.nn.Module:
    """A fake-quant model with BN statistics (and PACT ranges at their init) set on `calib`."""
    torch.manual_seed(0)
    model = create_model(name, **kw)
    quantize_(model, quant)
    set_bn_stats_(model, calib)
    return model


def binary_table(args, batches: list[int], calib: list[np.ndarray], tmp: Path) -> None:
    """wbab models in bacp order: the fake-quant PyTorch model, the same model with its binary
    convs on packed bits (XNOR + popcount), and its integer QDQ model in ORT."""
    names = [n for n in args.models.split(",") if n.startswith("nin")]
    if not names:
        return
    try:
        xnor.extension()
    except xnor.XnorBuildError as e:
        print(f"\nbinary path skipped: the XNOR extension does not build here ({e})")
        return
    print(
        f"\nBinary (wbab, bacp order), XNOR kernel ISA: {xnor.best_isa()}\n\n"
        "| model | batch | torch fake-quant ms | torch + XNOR convs ms | ORT int8 QDQ ms "
        "| XNOR vs fake-quant | XNOR vs ORT int8 | max abs diff XNOR |"
    )
    print("|---|---:|" + "---:|" * 6)
    for name in names:
        fake = qat_model(name, WBAB, calib, order="bacp")
        fuse_bn_(fake)
        packed = copy.deepcopy(fake).eval()
        replaced = xnor.convert_binary_convs_(packed)
        path = export_onnx(to_qdq(fake)[0], tmp / f"{name}_wbab.onnx", SHAPE)
        sess = session(path)
        x = torch.from_numpy(calib[0])
        with torch.no_grad():
            diff = (fake(x) - packed(x)).abs().max().item()
        for b in batches:
            reps = args.reps if b == 1 else max(3, args.reps // 4)
            f, p, q = best_of(
                3,
                [
                    partial(latency_ms, fake, SHAPE, b, reps),
                    partial(latency_ms, packed, SHAPE, b, reps),
                    partial(ort_latency_ms, sess, SHAPE, b, reps),
                ],
            )
            print(
                f"| {name} ({len(replaced)} XNOR convs) | {b} | {f:.2f} | {p:.2f} | {q:.2f} "
                f"| {f / p:.2f}x | {q / p:.2f}x | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
