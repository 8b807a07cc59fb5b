"""Training-step time of each quantization mode relative to fp32, side by side in one run.

    python bench/quant_overhead.py [--models nin,resnet20] [--batch 64] [--steps 3]

Every mode is timed on the same model, batch and machine, interleaved round by round so that
drifts in machine speed hit all modes alike; the table prints each mode's median step time
divided by fp32's.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from compress.models import create_model
from compress.quant import quantize_

MODES = {
    "fp32": ({"kind": "fp32"}, {"kind": "fp32"}),
    "w8a8": ({"kind": "dorefa", "bits": 8}, {"kind": "dorefa", "bits": 8}),
    "w4a4": ({"kind": "dorefa", "bits": 4}, {"kind": "dorefa", "bits": 4}),
    "w2a2": ({"kind": "dorefa", "bits": 2}, {"kind": "dorefa", "bits": 2}),
    "wba32": ({"kind": "binary"}, {"kind": "fp32"}),
    "wbab": ({"kind": "binary"}, {"kind": "binary"}),
    "wta32": ({"kind": "ternary"}, {"kind": "fp32"}),
    "wtab": ({"kind": "ternary"}, {"kind": "binary"}),
    "w4a4p": ({"kind": "dorefa", "bits": 4}, {"kind": "pact", "bits": 4}),
}


def make_step(name: str, mode: str, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = create_model(name)
    w, a = MODES[mode]
    quantize_(model, {"weight": w, "act": a})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nin,resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}\n")
    print("| model | " + " | ".join(MODES) + " |")
    print("|---|" + "---:|" * len(MODES))
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    for name in args.models.split(","):
        steps = {m: make_step(name, m, x, y) for m in MODES}
        for s in steps.values():  # warm up every mode
            s()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.steps):
            for m, s in steps.items():
                t0 = time.perf_counter()
                s()
                times[m].append(time.perf_counter() - t0)
        med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        cells = [f"{med[m] / med['fp32']:.2f}x" for m in MODES]
        print(
            f"| {name} (fp32 {1000 * med['fp32']:.0f} ms) | " + " | ".join(cells) + " |", flush=True
        )
    print("\n(step time relative to fp32; weights and activations fake-quantized in training)")


if __name__ == "__main__":
    main()
