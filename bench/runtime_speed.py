"""CPU inference latency in each runtime export.py writes: PyTorch eager fp32, ONNX Runtime fp32,
OpenVINO fp32 (CPU plugin, f32 precision), ncnn fp32 (one image at a time: no batch axis), and
the INT8 QDQ model (`quantize_int8`) in ORT and in OpenVINO (whose CPU plugin runs its convs and
classifier in int8). BN-fused models, random weights with BN statistics set as in
bench/deploy_speed.py; one markdown table, milliseconds per batch.

python bench/runtime_speed.py [--models nin,nin_gc,resnet20] [--batch 1,64] [--rounds 3]

Each cell is the best of `--rounds` interleaved rounds of median latencies, so drift of a shared
machine hits every column alike.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from deploy_speed import SHAPE, set_bn_stats_

from compress.deploy import (
    ArrayCalibrationReader,
    cpu_isa,
    export_onnx,
    ort_latency_ms,
    quantize_int8,
    require,
    session,
)
from compress.deploy.ncnn_export import export_ncnn, load_net, ncnn_latency_ms
from compress.deploy.openvino_export import compile_cpu, export_openvino, int8_layers, ov_latency_ms
from compress.fuse import fuse_bn_
from compress.metrics import latency_ms
from compress.models import create_model

COLUMNS = ("torch", "ORT fp32", "OV fp32", "ncnn fp32", "ORT int8", "OV int8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nin,nin_gc,resnet20")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ort, ov, ncnn = require("onnxruntime"), require("openvino"), require("ncnn")
    batches = [int(b) for b in args.batch.split(",")]
    isa = cpu_isa()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{ort.__version__}, openvino {ov.get_version()}, ncnn {ncnn.__version__}, pnnx "
        f"{require('pnnx').__version__}; CPU: {isa['cpu']}; int8 ISA: {isa['isa']}\n"
    )
    head = " | ".join(f"bs={b} {c} ms" for b in batches for c in COLUMNS)
    print(f"| model | OV int8 layers | {head} |")
    print("|---|---:|" + "---:|" * len(COLUMNS) * len(batches))
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((32, *SHAPE), dtype=np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create(name, calib)
            d = Path(tmp) / name
            fp32 = export_onnx(model, d / "model.onnx", SHAPE, name=name)
            int8 = quantize_int8(
                fp32, d / "model_int8.onnx", ArrayCalibrationReader(calib, "input"), "minmax"
            )
            ov8 = compile_cpu(int8)
            runs = {
                "ORT fp32": (ort_latency_ms, session(fp32)),
                "OV fp32": (ov_latency_ms, compile_cpu(export_openvino(fp32, d / "model.xml"))),
                "ncnn fp32": (ncnn_latency_ms, load_net(export_ncnn(model, d / "m.param", SHAPE))),
                "ORT int8": (ort_latency_ms, session(int8)),
                "OV int8": (ov_latency_ms, ov8),
            }
            layers = int8_layers(ov8)
            cells = [f"{layers.get('int8', 0)} / {sum(layers.values())}"]
            for b in batches:
                reps = args.reps if b == 1 else max(3, args.reps // 4)
                best = dict.fromkeys(COLUMNS, float("inf"))
                for _ in range(args.rounds):
                    best["torch"] = min(best["torch"], latency_ms(model, SHAPE, b, reps))
                    for col, (timer, loaded) in runs.items():
                        best[col] = min(best[col], timer(loaded, SHAPE, b, reps))
                cells += [f"{best[c]:.2f}" for c in COLUMNS]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def create(name: str, calib: list[np.ndarray]) -> torch.nn.Module:
    model = create_model(name)
    set_bn_stats_(model, calib)
    fuse_bn_(model)
    return model.eval()


if __name__ == "__main__":
    main()
