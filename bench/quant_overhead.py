"""Training-step time of each quantization mode relative to fp32, and of a knowledge-distillation
step relative to the plain QAT step of the same student, side by side in one run.

    python bench/quant_overhead.py [--models nin,resnet20] [--batch 64] [--steps 3]

Every mode is timed on the same model, batch and machine, interleaved round by round so that
drifts in machine speed hit all modes alike; the first table prints each mode's median step time
divided by fp32's, the second the KD step (compress.distill.Distiller: the fp32 teacher's eval
forward under no_grad, the KL term, the label loss) divided by the same QAT step without it
(goal: at most 1.35x).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from compress.distill import Distiller, cross_entropy_loss
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


KD_MODES = ("w4a4p", "w4a4l", "wbab")  # the students the KD table times (where available)


def make_step(name: str, mode: str, x: torch.Tensor, y: torch.Tensor, kd: bool = False):
    torch.manual_seed(0)
    model = create_model(name)
    teacher = copy.deepcopy(model)  # the fp32 model before quantization
    w, a = MODES[mode]
    quantize_(model, {"weight": w, "act": a})
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = Distiller(teacher, cross_entropy_loss()) if kd else None

    def step() -> None:
        out = model(x)
        loss = loss_fn(x, out, y) if loss_fn is not None else F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(steps: dict, rounds: int) -> dict[str, float]:
    """Median seconds per step of each entry, interleaved round by round after a warm-up."""
    for s in steps.values():
        s()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(rounds):
        for m, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[m].append(time.perf_counter() - t0)
    return {m: sorted(t)[len(t) // 2] for m, t in times.items()}


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
    names = args.models.split(",")
    for name in names:
        med = timed({m: make_step(name, m, x, y) for m in MODES}, args.steps)
        cells = [f"{med[m] / med['fp32']:.2f}x" for m in MODES]
        print(
            f"| {name} (fp32 {1000 * med['fp32']:.0f} ms) | " + " | ".join(cells) + " |", flush=True
        )
    print("\n(step time relative to fp32; weights and activations fake-quantized in training)")
    kd_modes = [m for m in KD_MODES if m in MODES]
    print("\n| model | " + " | ".join(f"{m} KD / {m}" for m in kd_modes) + " |")
    print("|---|" + "---:|" * len(kd_modes))
    for name in names:
        steps = {}
        for m in kd_modes:
            steps[m] = make_step(name, m, x, y)
            steps[m + "+kd"] = make_step(name, m, x, y, kd=True)
        med = timed(steps, args.steps)
        cells = []
        for m in kd_modes:
            plain, kd = med[m], med[m + "+kd"]
            cells.append(f"{kd / plain:.2f}x ({1000 * plain:.0f} -> {1000 * kd:.0f} ms)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\n(a KD step: the same student plus its fp32 teacher's eval forward; goal <= 1.35x)")


if __name__ == "__main__":
    main()
