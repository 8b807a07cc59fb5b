"""The channel-dependency graph on every kind of model: groups found, thinned vs masked outputs,
what 50% slimming leaves, and how long the graph takes to build.

    python bench/prune_graph.py [--percent 0.5]

Masked = the unpruned model with the BN scale and shift of every dropped channel zeroed; in eval
mode it computes exactly what the thinned model should, so |thinned - masked| is the error of
the thinning, shown relative to the largest logit (float rounding only, when the graph is right).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from compress.metrics import count_macs, count_params
from compress.models import create_model
from compress.prune import channel_graph, mask_, select_channels, thin

CASES = [
    ("nin", "normal"),
    ("nin_gc", "gc"),
    ("vgg_small", "regular"),
    ("resnet9", "normal"),
    ("resnet20", "normal"),
    ("resnet56", "regular"),
    ("tv:resnet18", "regular"),
    ("tv:mobilenet_v2", "normal"),
    ("tv:shufflenet_v2_x0_5", "normal"),
    ("tv:densenet121", "normal"),
]


def build(name: str) -> nn.Module:
    if name.startswith("tv:"):
        return create_model(name[3:], source="torchvision", num_classes=10)
    return create_model(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--percent", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    shape = (3, args.size, args.size)
    print(
        "| model | pruner | groups | prunable channels "
        "| max abs(thinned - masked) / max abs(masked) "
        "| params ratio | MACs ratio | graph build s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, kind in CASES:
        torch.manual_seed(0)
        model = build(name).eval()
        t0 = time.perf_counter()
        graph = channel_graph(model, shape)
        built = time.perf_counter() - t0
        for bn in graph.bn_names():  # stand-ins for trained, sparse BN scales
            nn.init.uniform_(model.get_submodule(bn).weight, 0.05, 1.0)
        base = 8 if kind == "regular" else 1
        keep = select_channels(graph, kind, args.percent, base=base, min_channels=base)
        small = thin(model, keep, shape).eval()
        x = torch.randn(2, *shape)
        with torch.no_grad():
            masked = mask_(graph, keep)(x)
            diff = ((small(x) - masked).abs().max() / masked.abs().max()).item()
        pr = count_params(small) / count_params(model)
        mr = count_macs(small, shape) / count_macs(model, shape)
        channels = sum(g.channels for g in graph.groups)
        print(
            f"| {name} | {kind} | {len(graph.groups)} | {channels} | {diff:.1e} | {pr:.2f} "
            f"| {mr:.2f} | {built:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
