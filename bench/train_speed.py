"""Training and inference throughput per model and precision, and the framework's overhead.

    python bench/train_speed.py [--models resnet20,nin] [--batch 128] [--steps 5]

Prints two tables, every number measured in this run on this machine:
1. images/s of a training step and of inference for each model in fp32, channels_last, bf16;
2. the framework's training loop (`engine.train_one_epoch` over a `TensorLoader`, augmentation
   included) against a bare PyTorch loop over ready tensors, same model and batch, and the
   share of a step spent in the data pipeline (gather, crop, flip, normalize).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from compress.data import Split, TensorLoader
from compress.engine import TrainConfig, autocast, build_optimizer, train_one_epoch
from compress.models import create_model, list_models


def timed(fn, steps: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def throughput(name: str, batch: int, steps: int, precision: str, channels_last: bool):
    torch.manual_seed(0)
    model = create_model(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dev = torch.device("cpu")

    def train_step():
        with autocast(dev, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer():
        with autocast(dev, precision):
            model(x)

    model.train()
    t_train = timed(train_step, steps)
    model.eval()
    t_inf = timed(infer, steps)
    return batch / t_train, batch / t_inf


def framework_vs_bare(name: str, batch: int, steps: int) -> tuple[float, float, float]:
    """Seconds per step: bare loop, framework loop, data pipeline alone."""
    n = batch * steps
    g = torch.Generator().manual_seed(0)
    split = Split(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.01, progress=False)
    loader = TensorLoader(split, batch, mean, std, train=True, crop_padding=4, flip=True)
    ready = [(x.clone(), y.clone()) for x, y in loader]

    torch.manual_seed(0)
    model = create_model(name)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def bare():
        model.train()
        for x, y in ready:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    def framework():
        train_one_epoch(model, loader, opt, sched, cfg)

    def data_only():
        for _ in loader:
            pass

    # Interleave the two loops so drifts in machine speed hit both alike.
    t_bare, t_fw = [], []
    for _ in range(3):
        t_bare.append(timed(bare, 1, warmup=1))
        t_fw.append(timed(framework, 1, warmup=1))
    t_data = timed(data_only, 3, warmup=1)
    return min(t_bare) / steps, min(t_fw) / steps, t_data / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--overhead-model", default="resnet20")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}\n")
    print(
        "| model | fp32 train | channels_last train | bf16 train | fp32 infer "
        "| channels_last infer | bf16 infer |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        tr, inf = [], []
        for prec, cl in (("fp32", False), ("fp32", True), ("bf16", True)):
            t, i = throughput(name, args.batch, args.steps, prec, cl)
            tr.append(t)
            inf.append(i)
        cells = [f"{v:.0f}" for v in tr + inf]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\n(images/s; bf16 runs under autocast with channels_last)\n")
    bare, fw, data = framework_vs_bare(args.overhead_model, args.batch, 8)
    print(
        "| model | bare loop s/step | framework s/step | framework / bare speed "
        "| data pipeline share of a step |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| {args.overhead_model} | {bare:.3f} | {fw:.3f} | {bare / fw:.2f}x "
        f"| {100 * data / fw:.1f}% |"
    )


if __name__ == "__main__":
    main()
