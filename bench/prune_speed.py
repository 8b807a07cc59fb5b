"""Pruning ratios, measured: params, MACs and CPU inference latency of pruned models against
the unpruned one, side by side in one run.

    python bench/prune_speed.py [--models nin,nin_gc,resnet20] [--batch 32] [--reps 10]

BN scales are drawn at random (a stand-in for a sparse-trained model, whose |gamma| ranking is
what decides which channels go; the speed of the thinned model depends only on the counts).
"""

from __future__ import annotations

import argparse

import torch

from compress.metrics import count_macs, count_params, latency_ms
from compress.models import create_model
from compress.prune import prunable_units, select_channels, thin
from compress.prune.pruner import has_group_convs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="nin,nin_gc,resnet20")
    ap.add_argument("--percents", default="0.3,0.5,0.7")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    shape = (3, 32, 32)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}\n")
    print(
        "| model | pruned | pruner | params ratio | MACs ratio | latency ratio "
        "| latency / MACs ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = create_model(name).eval()
        for u in prunable_units(model):
            torch.nn.init.uniform_(u.bn.weight, 0.0, 1.0)
        kind = "gc" if has_group_convs(model) else "normal"
        base = {"params": count_params(model), "macs": count_macs(model, shape)}
        lat0 = latency_ms(model, shape, args.batch, args.reps)
        for p in map(float, args.percents.split(",")):
            small = thin(model, select_channels(model, kind, p)).eval()
            lat = latency_ms(small, shape, args.batch, args.reps)
            lat0 = min(lat0, latency_ms(model, shape, args.batch, args.reps))  # re-measure
            pr = count_params(small) / base["params"]
            mr = count_macs(small, shape) / base["macs"]
            lr = lat / lat0
            print(
                f"| {name} | {p:.0%} | {kind} | {pr:.2f} | {mr:.2f} | {lr:.2f} | {lr / mr:.2f} |",
                flush=True,
            )
    print("\n(ratios pruned / unpruned; latency is the median forward time in eval mode)")


if __name__ == "__main__":
    main()
