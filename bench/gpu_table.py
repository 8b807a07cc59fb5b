"""The full-length recipes on one accelerator, as one table: accuracy, seconds per epoch and
images/s per recipe, with the device's name (`bench/gpu.sh` runs this on a lent GPU).

    python bench/gpu_table.py --out DIR [--scale 1.0] [--tiny]

Each recipe is an ordinary `train.py` run (its own folder under DIR, its metrics.json); the
epochs below are sized so the whole table fits in about 8 minutes on an H100 / H200, and
`--scale` stretches or shrinks all of them. `--tiny` runs every recipe for one epoch on the
synthetic data set: the CPU check that the script works end to end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = 50_000  # CIFAR-10 training images

# (row name, epochs at scale 1, overrides); batch 512, onecycle, on-GPU data and augmentation
FAST = [
    "schedule.batch_size=512",
    "schedule.lr=0.4",
    "schedule.lr_schedule=onecycle",
    "schedule.label_smoothing=0.1",
    "schedule.progress=false",
    "schedule.eval_every=5",
]
RECIPES = [
    ("nin fp32", 30, ["model=nin"]),
    ("resnet20 fp32", 30, ["model=resnet20"]),
    ("nin w8a8", 15, ["model=nin", "quant=w8a8"]),
    ("nin w4a4p", 15, ["model=nin", "quant=w4a4p"]),
    ("nin w2a2p", 15, ["model=nin", "quant=w2a2p"]),
    ("nin wbab (bacp)", 15, ["model=nin", "model.order=bacp", "quant=wbab"]),
    ("nin wtab (bacp)", 15, ["model=nin", "model.order=bacp", "quant=wtab"]),
    ("resnet20 w4a4p", 15, ["model=resnet20", "quant=w4a4p"]),
    (
        "resnet20 slim 50% + finetune",
        10,
        [
            "model=resnet20",
            "pruner.percent=0.5",
            "sparsity.s=1e-4",
            "schedule.stages=[sparse_train,prune,{stage:finetune,lr:0.1}]",
        ],
    ),
]
TINY = [
    "dataset=synthetic",
    "dataset.num_train=64",
    "dataset.num_test=32",
    "schedule.batch_size=16",
    "schedule.progress=false",
    "schedule.eval_every=1",
]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({torch.get_num_threads()} threads)"


def run(name: str, epochs: int, overrides: list[str], out: Path, tiny: bool) -> dict:
    folder = out / name.split(" (")[0].replace(" ", "_").replace("%", "").replace("+", "")
    extra = TINY if tiny else FAST
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        *extra,
        f"schedule.epochs={epochs}",
        f"hydra.run.dir={folder}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{folder.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"name": name, "error": last, "wall": wall}
    m = json.loads((folder / "metrics.json").read_text())
    stages = m.get("stages", [m])
    trained = [s for s in stages if s.get("epochs")]
    train_s = sum(s.get("wall_s", 0.0) for s in trained)
    n_epochs = sum(s["epochs"] for s in trained)
    images = (64 if tiny else TRAIN) * n_epochs
    return {
        "name": name,
        "acc": m["test_acc"],
        "epochs": n_epochs,
        "s_per_epoch": train_s / max(n_epochs, 1),
        "images_s": images / max(train_s, 1e-9),
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="outputs/gpu")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's epochs")
    ap.add_argument("--tiny", action="store_true", help="1 epoch on synthetic data (CPU check)")
    ap.add_argument("--only", default="", help="comma-separated row names to run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    lines = [
        f"device: {device_name()}, torch {torch.__version__}"
        + (" (tiny CPU check: synthetic data, not a result)" if args.tiny else ""),
        "",
        "| recipe | epochs | test acc (%) | s / epoch | images/s | wall s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name, epochs, overrides in RECIPES:
        if wanted and name not in wanted:
            continue
        n = 1 if args.tiny else max(1, round(epochs * args.scale))
        r = run(name, n, overrides, out, args.tiny)
        if "error" in r:
            row = f"| {name} | {n} | failed: {r['error']} | | | {r['wall']:.0f} |"
        else:
            row = (
                f"| {name} | {r['epochs']} | {r['acc']:.2f} | {r['s_per_epoch']:.1f} "
                f"| {r['images_s']:.0f} | {r['wall']:.0f} |"
            )
        lines.append(row)
        print(row, flush=True)
    (out / "gpu_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
