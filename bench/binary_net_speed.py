"""End-to-end latency of the packed binary network (compress.deploy.xnor.convert_binary_net_:
consecutive binary layers pass packed sign bits, channel shuffle and max pool in bit space)
against the fake-quant PyTorch model, the float-output XNOR path (convert_binary_convs_: every
XNOR conv writes fp32, PyTorch pools it, the next conv packs it again) and ONNX Runtime's int8
QDQ model of the same network. wbab NIN / NIN-GC in bacp order, random weights with BN
statistics set as in bench/deploy_speed.py, BN fused.

    python bench/binary_net_speed.py [--models nin,nin_gc] [--batch 1,64] [--reps 20]
                                     [--malloc system|keep]

--malloc keep makes glibc keep freed large blocks (mallopt: no mmap / trim for them), so
PyTorch's fresh activation tensors reuse memory instead of page-faulting it in on every call
(ONNX Runtime has its own arena either way): at batch 64 the fp32 stem of NIN writes 50 MB per
call, and its page faults cost about as much as its arithmetic. Process-wide: it applies to
every PyTorch column alike.

Columns (milliseconds per batch, best of 3 interleaved rounds of median latencies):
  fake-quant   the BN-fused fake-quant model in PyTorch eager
  float I/O    convert_binary_convs_: XNOR convs with fp32 input and output
  packed       XnorNet(convert_binary_net_(model)): bits between binary layers (a flat
               forward over the layers); bit-identical to float I/O
  packed+      the same with convert_binary_net_(model, channels_last=True,
               xnor_scaled_convs=True): the stem conv on NHWC memory (kept only where
               bit-identical to NCHW, checked at conversion) packed straight from NHWC, and
               the last binary block's BN-folded +-t[o] conv as an XNOR conv on the bits
               (within fp32 rounding)
  ORT int8     ONNX Runtime on the int8 QDQ model of the same network (to_qdq)
"vs ORT" is ORT int8 ms / packed ms (> 1: the packed network is faster); "diff" is the largest
|logit| difference to the float I/O path on a batch of 32 (0: bit-identical).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from deploy_speed import SHAPE, WBAB, best_of, qat_model  # noqa: E402

from compress.deploy import ort_latency_ms, require, session, xnor  # noqa: E402
from compress.deploy.onnx_export import export_onnx  # noqa: E402
from compress.deploy.qdq import to_qdq  # noqa: E402
from compress.fuse import fuse_bn_  # noqa: E402
from compress.metrics import latency_ms  # noqa: E402


def keep_freed_memory() -> None:
    """glibc: serve large allocations from the heap and never trim it (mallopt)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    big = ctypes.c_int(2**31 - 1)
    if not (libc.mallopt(-3, big) and libc.mallopt(-1, big)):  # M_MMAP_THRESHOLD, M_TRIM_
        raise RuntimeError("mallopt failed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nin,nin_gc")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--malloc", default="system", choices=["system", "keep"])
    args = ap.parse_args()
    if args.malloc == "keep":
        keep_freed_memory()
    ort = require("onnxruntime")
    batches = [int(b) for b in args.batch.split(",")]
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((32, *SHAPE), dtype=np.float32) for _ in range(4)]
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{ort.__version__}, XNOR kernel ISA: {xnor.best_isa()}, malloc: {args.malloc}\n"
    )
    print(
        "| model | batch | fake-quant ms | float I/O ms | packed ms | packed+ ms | ORT int8 ms "
        "| packed vs ORT | packed+ vs ORT | packed vs float I/O | diff packed | diff packed+ |"
    )
    print("|---|---:|" + "---:|" * 10)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            fake = qat_model(name, WBAB, calib, order="bacp")
            fuse_bn_(fake)
            floatio = copy.deepcopy(fake).eval()
            xnor.convert_binary_convs_(floatio)
            packed = copy.deepcopy(fake).eval()
            xnor.convert_binary_net_(packed)
            packed = xnor.XnorNet(packed)
            plus = copy.deepcopy(fake).eval()
            xnor.convert_binary_net_(plus, channels_last=True, xnor_scaled_convs=True)
            plus = xnor.XnorNet(plus)
            sess = session(export_onnx(to_qdq(fake)[0], Path(tmp) / f"{name}.onnx", SHAPE))
            x = torch.from_numpy(calib[0])
            with torch.no_grad():
                ref = floatio(x)
                diff = [(m(x) - ref).abs().max().item() for m in (packed, plus)]
            for b in batches:
                reps = args.reps if b == 1 else max(3, args.reps // 4)
                f, fio, p, pp, q = best_of(
                    args.rounds,
                    [partial(latency_ms, m, SHAPE, b, reps) for m in (fake, floatio, packed, plus)]
                    + [partial(ort_latency_ms, sess, SHAPE, b, reps)],
                )
                print(
                    f"| {name} | {b} | {f:.2f} | {fio:.2f} | {p:.2f} | {pp:.2f} | {q:.2f} "
                    f"| {q / p:.2f}x | {q / pp:.2f}x | {fio / p:.2f}x | {diff[0]:.1e} "
                    f"| {diff[1]:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
