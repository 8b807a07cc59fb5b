"""Collect the metrics.json of many runs into results.csv, results.md and tradeoff.png.

    python -m compress.report DIR      # every run below DIR (a sweep, or any folder of runs)

A multirun writes the same files into its sweep directory when it ends (`SweepReport`, a
Hydra callback configured in conf/hydra/default.yaml).

Every run gets a row, finished or not: `status` is `ok`, `failed: REASON` or `diverged: REASON`
(from the job's failed.json, see `compress.cli.sweep_job`; a non-finite loss or accuracy in
metrics.json is `diverged` too), or `failed: no metrics (interrupted?)` for a run folder with
neither file. Only `ok` rows are compared, plotted and can be the best.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, ClassVar

import yaml

from compress.cli import FAILED_FILE

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
    "status",
    "delta_vs_fp32",
    "params",
    "macs",
    "size_bytes",
    "compression_pct",
    "latency_ms",
    "epochs",
    "wall_s",
]


NO_METRICS = "failed: no metrics (interrupted?)"
# what marks a run folder: its results, its failure, the config train.py saves, Hydra's .hydra/
RUN_MARKERS = ("metrics.json", FAILED_FILE, "config.yaml", ".hydra")


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _metrics_status(m: dict[str, Any]) -> str:
    """`ok`, or `diverged: ...` when the run recorded a non-finite loss or accuracy (a run that
    ended like that must never pass for a result, let alone the best one)."""
    last = (m.get("history") or [{}])[-1]
    for source, where in ((m, ""), (last, f" (epoch {last.get('epoch')})")):
        for key in ("test_acc", "best_test_acc", "test_loss", "train_loss"):
            if not _finite(source.get(key)):
                return f"diverged: non-finite {key.replace('_', ' ')}{where}"
    return "ok"


def _config_names(run: Path) -> dict[str, Any]:
    """model / dataset / quant names from the run's saved config, for a run without metrics."""
    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        try:
            cfg = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(cfg, dict):
            name = {
                k: (cfg.get(k) or {}).get("name") if isinstance(cfg.get(k), dict) else None
                for k in ("model", "dataset", "quant")
            }
            return {k: v for k, v in name.items() if v is not None}
    return {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _row(run: Path, root: Path) -> dict[str, Any]:
    failed = _read_json(run / FAILED_FILE) if (run / FAILED_FILE).exists() else None
    m = _read_json(run / "metrics.json") if (run / "metrics.json").exists() else None
    if failed is not None:
        kind, reason = failed.get("status") or "failed", failed.get("reason")
        status = f"{kind}: {reason}" if reason else kind
    elif m is not None:
        status = _metrics_status(m)
    elif (run / "metrics.json").exists():
        status = "failed: unreadable metrics.json"
    else:
        status = NO_METRICS
    if m is None or failed is not None:  # no result to show: say what the run was
        names = _config_names(run)
        row = {c: None for c in COLUMNS}
        row.update({"quant": "fp32", **names})
        row.update(run=str(run.relative_to(root)) or ".", status=status)
        return row
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
        "status": status,
        "params": m.get("params"),
        "macs": m.get("macs"),
        "size_bytes": m.get("size_bytes"),
        "latency_ms": m.get("latency_ms"),
        "epochs": m.get("epochs"),
        "wall_s": m.get("wall_s"),
    }


def _natural(path: Path) -> list[Any]:
    """Sort key: job 10 after job 9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def run_dirs(root: str | Path) -> list[Path]:
    """The run folders below `root` (or `root` itself): folders with a run marker, except a
    pipeline's stages (stage.json) and anything inside another run (a stage not yet done)."""
    root = Path(root)
    found = set()
    for marker in RUN_MARKERS:
        for path in root.rglob(marker):
            if path.parent.name != ".hydra":  # .hydra/config.yaml is Hydra's, not a run's
                found.add(path.parent)
    found = {d for d in found if not (d / "stage.json").exists()}
    return sorted((d for d in found if not any(a in found for a in d.parents)), key=_natural)


def collect(root: str | Path) -> list[dict[str, Any]]:
    """One row per run folder below `root`, failed and unfinished ones included."""
    root = Path(root)
    rows = [_row(run, root) for run in run_dirs(root)]
    baselines: dict[tuple[Any, Any], dict[str, Any]] = {}  # the first fp32, unpruned run
    for b in rows:
        if b["status"] == "ok" and b["quant"] == "fp32" and b["pruned"] == "no":
            baselines.setdefault((b["model"], b["dataset"]), b)
    for r in rows:  # compare with the fp32 run of the same model and data, when the set has one
        base = baselines.get((r["model"], r["dataset"]))
        ok = r["status"] == "ok" and base is not None
        ok = ok and None not in (base["test_acc"], r["test_acc"])
        r["delta_vs_fp32"] = round(r["test_acc"] - base["test_acc"], 2) if ok else None
        sized = ok and base["size_bytes"] and r["size_bytes"]
        r["compression_pct"] = (
            round(100 * (1 - r["size_bytes"] / base["size_bytes"]), 1) if sized else None
        )
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished run with the highest test accuracy; never a failed or diverged one."""
    done = [r for r in rows if r["status"] == "ok" and r["test_acc"] is not None]
    return max(done, key=lambda r: r["test_acc"], default=None)


def summary(rows: list[dict[str, Any]]) -> str:
    """One line: how many runs, how many of them failed or diverged, and the best."""
    kinds = [r["status"].split(":", 1)[0] for r in rows]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("ok", "failed", "diverged") if k in kinds)
    line = f"{len(rows)} runs: {counts or 'none'}"
    top = best(rows)
    if top is not None:
        line += f"; best {top['run']} ({top['test_acc']:.2f}%)"
    return line


def not_ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "ok"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)


def _cell(v: Any) -> str:
    return _fmt(v).replace("|", "\\|")  # a reason may hold a '|'


def write_report(root: str | Path) -> list[dict[str, Any]]:
    root = Path(root)
    rows = collect(root)
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", summary(rows)]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    plot_tradeoff(rows, root / "tradeoff.png")
    return rows


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against model size, one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["status"] == "ok" and r["test_acc"] is not None and r["size_bytes"]]
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
    into the sweep directory when a multirun ends, and keep how many jobs did not finish in
    `SweepReport.failed` (the entry point exits non-zero after Hydra returns when any did)."""

    failed: ClassVar[int] = 0  # of the last sweep in this process

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        SweepReport.failed = 0

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        # Hydra turns a callback's exception into a warning: until the report is written and
        # says otherwise, count the sweep as not all good, so the exit code still tells
        SweepReport.failed = 1
        rows = write_report(sweep_dir)
        bad = not_ok(rows)
        SweepReport.failed = len(bad)
        print(f"sweep report: {summary(rows)} -> {sweep_dir}/results.md", flush=True)
        for r in bad:
            print(f"  {r['run']}: {r['status']}", file=sys.stderr, flush=True)

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
