"""Time to accuracy: the framework's training of the results table's base (`engine.fit` with
experiment=base_cpu's recipe) against a bare PyTorch loop of the same recipe, one after the
other on this machine, each evaluated after every epoch.

    python bench/time_to_accuracy.py [--epochs 60] [--targets 85,90] [--tiny]

The bare loop is what a user writes from the PyTorch tutorial: torchvision's CIFAR10 data set,
RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize in a DataLoader, the
same ResNet-20, SGD + Nesterov with the same one-cycle LR, label smoothing and weight decay
groups, the same autocast. Printed per loop: the accuracy after each epoch, and for each target
and for the final accuracy the epoch, the wall minutes (training and the per-epoch evaluation)
and the training PFLOPs (3 x 2 x forward MACs x images seen: forward and backward) it took.
`--tiny`: 2 epochs on 1,024 images (a check that the script runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.data.datasets import load_cifar10  # noqa: E402
from compress.engine import (  # noqa: E402
    Callback,
    TrainConfig,
    autocast,
    build_optimizer,
    fit,
    for_device,
    lr_factor,
)
from compress.metrics import count_macs  # noqa: E402
from compress.models import create_model  # noqa: E402


def recipe(epochs: int) -> TrainConfig:
    """experiment=base_cpu's schedule, as the config file says it."""
    cfg = yaml.safe_load((ROOT / "conf/experiment/base_cpu.yaml").read_text())["schedule"]
    cfg |= {"epochs": epochs, "eval_every": 1, "tta": False, "progress": False}
    return for_device(TrainConfig.from_dict(cfg), torch.device("cpu"))


def framework(data, cfg: TrainConfig, out: Path) -> list[tuple[float, float]]:
    """(wall seconds so far, test accuracy) after each epoch of engine.fit."""
    marks: list[float] = []

    class Clock(Callback):
        def on_epoch_end(self, epoch, model, writer) -> None:
            marks.append(time.perf_counter())

    torch.manual_seed(0)
    model = create_model("resnet20")
    t0 = time.perf_counter()
    summary = fit(model, data, cfg, out, torch.device("cpu"), callbacks=[Clock()])
    return [(t - t0, row["test_acc"]) for t, row in zip(marks, summary["history"], strict=True)]


def bare(root: Path, cfg: TrainConfig, limit: int | None) -> list[tuple[float, float]]:
    """The same recipe as a plain torchvision DataLoader loop."""
    import torchvision
    import torchvision.transforms as T

    class CIFAR10(torchvision.datasets.CIFAR10):
        def _check_integrity(self) -> bool:  # the supplied copy is JPEG-recompressed: no MD5
            return True

        def _load_meta(self) -> None:
            self.classes = load_cifar10(root).classes
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm]
    )
    train = CIFAR10(str(root), train=True, transform=train_tf)
    test = CIFAR10(str(root), train=False, transform=T.Compose([T.ToTensor(), norm]))
    if limit:
        train = torch.utils.data.Subset(train, range(limit))
        test = torch.utils.data.Subset(test, range(limit // 4))
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        train, cfg.batch_size, shuffle=True, drop_last=True, generator=g
    )
    test_loader = torch.utils.data.DataLoader(test, cfg.eval_batch_size)
    torch.manual_seed(0)
    model = create_model("resnet20")
    opt = build_optimizer(model, cfg)
    steps = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s, steps))
    dev = torch.device("cpu")
    out, t0 = [], time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for x, y in loader:
            with autocast(dev, cfg.precision):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        correct = n = 0
        with torch.no_grad(), autocast(dev, cfg.precision):
            for x, y in test_loader:
                correct += int((model(x).argmax(1) == y).sum())
                n += len(y)
        out.append((time.perf_counter() - t0, 100.0 * correct / n))
    return out


def report(name: str, curve: list[tuple[float, float]], targets: list[float], pflops: float):
    """Markdown rows: each target and the final accuracy, when first reached."""
    rows = []
    final = curve[-1][1]
    for target in [*targets, final]:
        hit = next((i for i, (_, acc) in enumerate(curve) if acc >= target), None)
        what = f"{target:.2f}% (final)" if target is final else f"{target:g}%"
        if hit is None:
            rows.append(
                f"| {name} | {what} | not reached (best {max(a for _, a in curve):.2f}%) | | |"
            )
            continue
        secs = curve[hit][0]
        rows.append(f"| {name} | {what} | {hit + 1} | {secs / 60:.1f} | {(hit + 1) * pflops:.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--targets", default="85,90")
    ap.add_argument("--data", type=Path, default=ROOT / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "time_to_accuracy")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    limit = 1024 if a.tiny else None
    epochs = 2 if a.tiny else a.epochs
    targets = [float(t) for t in a.targets.split(",") if t]
    cfg = recipe(epochs)
    data = load_cifar10(a.data)
    if limit:  # the first images, as the bare loop's Subset takes them
        from dataclasses import replace

        from compress.data.datasets import Split

        def cut(s: Split, n: int) -> Split:
            return Split(s.images[:n], s.labels[:n])

        data = replace(data, train=cut(data.train, limit), test=cut(data.test, limit // 4))
    images = len(data.train) // cfg.batch_size * cfg.batch_size
    pflops = 3 * 2 * count_macs(create_model("resnet20"), (3, 32, 32)) * images / 1e15
    head = f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
    print(f"{head}precision {cfg.precision}, {epochs} epochs, {pflops:.3f} PFLOPs an epoch")
    curves = {"framework (engine.fit)": framework(data, cfg, a.out / "framework")}
    curves["bare PyTorch loop"] = bare(a.data, cfg, limit)
    for name, curve in curves.items():
        print(name, " ".join(f"{acc:.2f}" for _, acc in curve), flush=True)
    print("\n| loop | accuracy | epochs | minutes | training PFLOPs |")
    print("|---|---|---:|---:|---:|")
    for name, curve in curves.items():
        print("\n".join(report(name, curve, targets, pflops)))
    fw, b = curves["framework (engine.fit)"][-1][0], curves["bare PyTorch loop"][-1][0]
    print(f"\nwall time of all {epochs} epochs: framework {fw / 60:.1f} min, bare {b / 60:.1f} min"
          f" (the framework {b / fw:.2f}x as fast)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
