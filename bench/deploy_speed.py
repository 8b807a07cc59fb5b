"""CPU inference latency: PyTorch eager fp32 against ONNX Runtime fp32 and ORT static INT8 (QDQ,
per-channel int8 weights, uint8 activations), BN-fused models, one markdown table.

python bench/deploy_speed.py [--models nin,nin_gc,resnet20] [--batch 1,64] [--method minmax]

Random weights are fine for speed, once the BN statistics are set on random N(0, 1) batches
(with the init's statistics NIN's activations decay into denormals, which slows PyTorch ~10x
and measures nothing real); INT8 is calibrated on such batches too (the ranges only move the
scales, not the work). Each cell is the best of 3 interleaved rounds of median
latencies, so drift of a shared machine hits every column alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

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
)
from compress.fuse import fuse_bn_
from compress.metrics import latency_ms
from compress.models import create_model

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
    head = " | ".join(
        f"bs={b} torch ms | bs={b} ORT fp32 ms | bs={b} ORT int8 ms | bs={b} int8 vs ORT fp32 "
        f"| bs={b} int8 vs torch"
        for b in batches
    )
    print(f"| model | fp32 / int8 bytes | {head} |")
    print("|---|---:|" + "---:|" * 5 * len(batches))
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((32, *SHAPE), dtype=np.float32) for _ in range(args.calib_batches)]
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
            s32, s8 = session(fp32), session(int8)
            cells = [f"{fp32.stat().st_size} / {int8.stat().st_size}"]
            for b in batches:
                reps = args.reps if b == 1 else max(3, args.reps // 4)
                t, f, i = [], [], []
                for _ in range(3):
                    t.append(latency_ms(model, SHAPE, b, reps))
                    f.append(ort_latency_ms(s32, SHAPE, b, reps))
                    i.append(ort_latency_ms(s8, SHAPE, b, reps))
                t_, f_, i_ = min(t), min(f), min(i)
                cells += [
                    f"{t_:.2f}",
                    f"{f_:.2f}",
                    f"{i_:.2f}",
                    f"{f_ / i_:.2f}x",
                    f"{t_ / i_:.2f}x",
                ]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
