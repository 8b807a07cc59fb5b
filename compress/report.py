"""Collect the metrics.json of many runs into results.csv, results.md and tradeoff.png.

    python -m compress.report DIR      # every run below DIR (a sweep, or any folder of runs)

A multirun writes the same files into its sweep directory when it ends (`SweepReport`, a
Hydra callback configured in conf/hydra/default.yaml).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = [
    "run",
    "model",
    "dataset",
    "quant",
    "w_bits",
    "a_bits",
    "stages",
    "pruned",
    "test_acc",
    "delta_vs_fp32",
    "params",
    "macs",
    "size_bytes",
    "compression_pct",
    "latency_ms",
    "epochs",
    "wall_s",
]


def _row(run: Path, root: Path, m: dict[str, Any]) -> dict[str, Any]:
    stages = m.get("stages")
    channels = m.get("channels") or next(
        (s.get("channels") for s in stages or [] if s.get("channels")), None
    )
    return {
        "run": str(run.relative_to(root)) or ".",
        "model": m.get("model"),
        "dataset": m.get("dataset"),
        "quant": m.get("quant", "fp32"),
        "w_bits": m.get("w_bits", 32),
        "a_bits": m.get("a_bits", 32),
        "stages": "+".join(s["kind"] for s in stages) if stages else "train",
        "pruned": "yes" if channels else "no",
        "test_acc": m.get("test_acc"),
        "params": m.get("params"),
        "macs": m.get("macs"),
        "size_bytes": m.get("size_bytes"),
        "latency_ms": m.get("latency_ms"),
        "epochs": m.get("epochs"),
        "wall_s": m.get("wall_s"),
    }


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per run folder below `root` (a folder whose metrics.json is not a stage's)."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("metrics.json")):
        if (path.parent / "stage.json").exists():
            continue  # a stage of a pipeline: its run's own metrics.json summarizes it
        rows.append(_row(path.parent, root, json.loads(path.read_text())))
    baselines: dict[tuple[Any, Any], dict[str, Any]] = {}  # the first fp32, unpruned run
    for b in rows:
        if b["quant"] == "fp32" and b["pruned"] == "no":
            baselines.setdefault((b["model"], b["dataset"]), b)
    for r in rows:  # compare with the fp32 run of the same model and data, when the set has one
        base = baselines.get((r["model"], r["dataset"]))
        ok = base is not None and None not in (base["test_acc"], r["test_acc"])
        r["delta_vs_fp32"] = round(r["test_acc"] - base["test_acc"], 2) if ok else None
        sized = base is not None and base["size_bytes"] and r["size_bytes"]
        r["compression_pct"] = (
            round(100 * (1 - r["size_bytes"] / base["size_bytes"]), 1) if sized else None
        )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def write_report(root: str | Path) -> list[dict[str, Any]]:
    root = Path(root)
    rows = collect(root)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    plot_tradeoff(rows, root / "tradeoff.png")
    return rows


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against model size, one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["test_acc"] is not None and r["size_bytes"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for model in sorted({r["model"] for r in pts}):
        mine = [r for r in pts if r["model"] == model]
        ax.scatter(
            [r["size_bytes"] / 1024 for r in mine], [r["test_acc"] for r in mine], label=model
        )
        for r in mine:
            ax.annotate(
                r["quant"] + ("+pruned" if r["pruned"] == "yes" else ""),
                (r["size_bytes"] / 1024, r["test_acc"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel("weight storage (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy / size trade-off")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class SweepReport:
    """Hydra callback (duck-typed, so this library never imports Hydra): write the report
    into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        rows = write_report(config.hydra.sweep.dir)
        print(f"sweep report: {len(rows)} runs -> {config.hydra.sweep.dir}/results.md")

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m compress.report DIR", file=sys.stderr)
        return 2
    rows = write_report(argv[0])
    print((Path(argv[0]) / "results.md").read_text(), end="")
    print(f"{len(rows)} runs -> {argv[0]}/results.csv, results.md, tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
