"""Per-layer latency of the XNOR + popcount binary conv against fp32 and int8 convs (CPU).

    python bench/xnor_speed.py [--repeat 30] [--threads 1 2]

Rows: NIN / NIN-GC shapes, batch 1 and 16. Columns (milliseconds, median of `repeat` runs):
  fp32      torch F.conv2d on float NCHW
  int8      ONNX Runtime QLinearConv (uint8 activations, int8 per-channel weights, MLAS), when
            onnxruntime and onnx are installed; "n/a" otherwise
  xnor      xnor_conv2d on the float NCHW input (sign + bit packing fused into the call, as in
            XnorConv2d.forward), float NCHW out
  xnor_k    the same call on activations pre-packed by pack_activations (no sign + pack)
  int8/xnor the speed-up over int8 (the issue's goal: >= 2)
Prints a markdown table and the instruction set the kernel chose.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from compress.deploy import xnor

# (name, cin, cout, kernel, groups, size)
SHAPES = [
    ("nin 3x3", 192, 192, 3, 1, 8),
    ("nin 3x3", 192, 192, 3, 1, 16),
    ("nin 1x1", 192, 160, 1, 1, 16),
    ("nin_gc 3x3 g2", 256, 256, 3, 2, 16),
    ("nin_gc 3x3 g16", 256, 256, 3, 16, 16),
]


def timeit(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def ort_int8(cin, cout, k, groups, batch, size, threads):
    """A callable running one QLinearConv in ONNX Runtime, or None without onnxruntime."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(cout, cin // groups, k, k), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, cout).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(cout, np.int8), "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
        numpy_helper.from_array(np.array(128, np.uint8), "yz"),
    ]
    node = helper.make_node(
        "QLinearConv",
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
        ["y"],
        kernel_shape=[k, k],
        pads=[k // 2] * 4,
        strides=[1, 1],
        group=groups,
    )
    graph = helper.make_graph(
        [node],
        "qconv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [batch, cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(
        model.SerializeToString(),
        opts,
        providers=["CPUExecutionProvider"],
    )
    x = rng.integers(0, 256, size=(batch, cin, size, size), dtype=np.uint8)
    return lambda: sess.run(None, {"x": x})


@torch.no_grad()
def time_torch(xs, wq, pw, scale, k, groups, repeat):
    """(fp32 conv, XNOR conv from float input, XNOR kernel on packed input) in ms."""
    pad = k // 2
    fp32 = timeit(lambda: F.conv2d(xs, wq, None, 1, pad, 1, groups), repeat)
    full = timeit(lambda: xnor.xnor_conv2d(xs, pw, scale, None, 1, pad, groups), repeat)
    packed = xnor.pack_activations(xs, groups)
    kern = timeit(lambda: xnor.xnor_conv2d(packed, pw, scale, None, 1, pad, groups), repeat)
    return fp32, full, kern


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args()
    print(f"XNOR kernel instruction set: {xnor.best_isa()} (available: {xnor.available_isas()})")
    with open("/proc/cpuinfo") as f:
        flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    int8_isa = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni", "avx2") if f in flags]
    print(f"int8 instruction sets on this CPU (ORT / MLAS picks among them): {int8_isa}")
    print()
    print(
        "| layer | in->out | HxW | batch | threads | fp32 ms | int8 ORT ms | xnor ms "
        "| xnor kernel ms | fp32/xnor | int8/xnor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name, cin, cout, k, groups, size in SHAPES:
        for batch in args.batches:
            x = torch.randn(batch, cin, size, size)
            xs = torch.copysign(torch.ones(()), x)
            w = torch.randn(cout, cin // groups, k, k)
            wq = torch.copysign(torch.ones(()), w) * w.abs().mean((1, 2, 3), keepdim=True)
            pw = xnor.pack_weight(wq, groups)
            scale = wq.abs().amax((1, 2, 3)).contiguous()
            for threads in args.threads:
                torch.set_num_threads(threads)
                fp32, full, kern = time_torch(xs, wq, pw, scale, k, groups, args.repeat)
                run = ort_int8(cin, cout, k, groups, batch, size, threads)
                int8 = timeit(run, args.repeat) if run is not None else None
                i8 = f"{int8:.3f}" if int8 is not None else "n/a"
                ratio = f"{int8 / full:.2f}x" if int8 is not None else "n/a"
                print(
                    f"| {name} | {cin}->{cout} | {size}x{size} | {batch} | {threads} "
                    f"| {fp32:.3f} | {i8} | {full:.3f} | {kern:.3f} | {fp32 / full:.2f}x "
                    f"| {ratio} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
