"""Pruning ratios, measured: params, MACs and CPU inference latency of pruned models against
the unpruned one, side by side in one run.

    python bench/prune_speed.py [--cases nin:normal,nin_gc:gc,resnet20:normal,resnet20:regular8]
                                [--percents 0.3,0.5,0.7] [--batch 32] [--reps 10] [--rounds 5]
                                [--fuse] [--channels-last] [--compile]

A case is model:pruner, where regularN is pruner=regular pruner.base=N. BN scales are drawn at
random (a stand-in for a sparse-trained model, whose |gamma| ranking is what decides which
channels go; the speed of the thinned model depends only on the counts). Unpruned and pruned
models are timed in interleaved rounds (best of `--rounds`), so that machine drift hits both
alike.
`--fuse` folds BN into the convs of both first (the deployed form), `--channels-last` runs
both in NHWC, `--compile` times both compiled with torch.compile (inductor, frozen weights:
BN and ReLU folded into oneDNN convolutions).
"""

from __future__ import annotations

import argparse
import copy

import torch

from compress.fuse import fuse_bn_
from compress.metrics import count_macs, count_params, latency_ms
from compress.models import create_model
from compress.prune import channel_graph, select_channels, thin

SHAPE = (3, 32, 32)


def parse_case(case: str) -> tuple[str, str, int]:
    name, _, pruner = case.partition(":")
    if pruner.startswith("regular"):
        return name, "regular", int(pruner[len("regular") :] or 8)
    return name, pruner or "normal", 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="nin:normal,nin_gc:gc,resnet20:normal,resnet20:regular8")
    ap.add_argument("--percents", default="0.3,0.5,0.7")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; best one counts")
    ap.add_argument("--fuse", action="store_true", help="fold BN into convs before timing")
    ap.add_argument("--channels-last", action="store_true", help="time in NHWC memory format")
    ap.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    args = ap.parse_args()
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # constant weights: prepacked oneDNN convs, BN folded
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{'BN fused' if args.fuse else 'BN unfused'}, "
        f"{'channels_last' if args.channels_last else 'NCHW'}"
        f"{', torch.compile' if args.compile else ', eager'}\n"
    )
    print(
        "| model | pruned | pruner | params ratio | MACs ratio | latency ms (unpruned) "
        "| latency ratio | latency / MACs ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")

    def deployed(m: torch.nn.Module) -> torch.nn.Module:
        m = copy.deepcopy(m).eval()
        if args.fuse:
            fuse_bn_(m)
        if args.compile:
            if args.channels_last:
                m.to(memory_format=torch.channels_last)
            m = torch.compile(m)
        return m

    def latency(m: torch.nn.Module) -> float:  # a compiled model compiles in the warm-up
        return latency_ms(m, SHAPE, args.batch, args.reps, channels_last=args.channels_last)

    for case in args.cases.split(","):
        name, kind, base = parse_case(case)
        torch.manual_seed(0)
        if name.startswith("tv_"):  # a torchvision model: tv_resnet18, tv_mobilenet_v2
            model = create_model(name[3:], source="torchvision", num_classes=10).eval()
        else:
            model = create_model(name).eval()
        graph = channel_graph(model, SHAPE)
        for bn in graph.bn_names():  # stand-ins for trained, sparse BN scales
            torch.nn.init.uniform_(model.get_submodule(bn).weight, 0.0, 1.0)
        params0, macs0 = count_params(model), count_macs(model, SHAPE)
        full = deployed(model)
        for p in map(float, args.percents.split(",")):
            keep = select_channels(graph, kind, p, base, min_channels=base)
            small = thin(model, keep, SHAPE).eval()
            pr, mr = count_params(small) / params0, count_macs(small, SHAPE) / macs0
            small = deployed(small)
            t_full, t_small = [], []
            for _ in range(args.rounds):
                t_full.append(latency(full))
                t_small.append(latency(small))
            lr = min(t_small) / min(t_full)
            label = f"regular (base {base})" if kind == "regular" else kind
            ms = f"{min(t_small):.1f} ({min(t_full):.1f})"
            print(
                f"| {name} | {p:.0%} | {label} | {pr:.2f} | {mr:.2f} | {ms} | {lr:.2f} "
                f"| {lr / mr:.2f} |",
                flush=True,
            )
    print(
        "\n(ratios pruned / unpruned; latency: median forward time in eval mode, best of the "
        "rounds)"
    )


if __name__ == "__main__":
    main()
