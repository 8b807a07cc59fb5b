"""CPU inference latency of BN-fused models against unfused ones, side by side in one run.

python bench/fuse_speed.py [--models nin,nin_gc,resnet20,vgg_small] [--batch 1,64]
"""

from __future__ import annotations

import argparse
import copy

import torch

from compress.fuse import fuse_bn_
from compress.metrics import latency_ms
from compress.models import create_model, list_models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    head = " | ".join(f"bs={b} unfused ms | bs={b} fused ms | bs={b} speed-up" for b in batches)
    print(f"| model | {head} |")
    print("|---|" + "---:|---:|---:|" * len(batches))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name).eval()
        fused = copy.deepcopy(model)
        fuse_bn_(fused)
        cells = []
        for b in batches:
            reps = args.reps if b == 1 else max(3, args.reps // 4)
            t_u, t_f = [], []
            for _ in range(3):  # interleaved rounds: machine drift hits both alike
                t_u.append(latency_ms(model, (3, 32, 32), b, reps))
                t_f.append(latency_ms(fused, (3, 32, 32), b, reps))
            u, f = min(t_u), min(t_f)
            cells += [f"{u:.2f}", f"{f:.2f}", f"{u / f:.2f}x"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
