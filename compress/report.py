"""Collect the metrics.json of many runs into results.csv, results.md and tradeoff.png.

    python -m compress.report DIR      # every run below DIR (a sweep, or any folder of runs)

A multirun writes the same files into its sweep directory when it ends (`SweepReport`, a
Hydra callback configured in conf/hydra/default.yaml).

Every run gets a row, finished or not: `status` is `ok`, `failed: REASON` or `diverged: REASON`
(from the job's failed.json, see `compress.cli.sweep_job`; a non-finite loss or accuracy in
metrics.json is `diverged` too), or `failed: no metrics (interrupted?)` for a run folder with
neither file. Only `ok` rows are compared, plotted and can be the best.

`stages` says what the job was: `train`, `prune`, `fuse`, `calibrate`, `export`, `pack`
(`job_kind`: what its entry point writes), a pipeline's stage kinds joined by `+`. `size_bytes`
is the weights at their bit widths (metrics' size_bytes), else the size of the file a deploy job
wrote (int8 / ONNX / OpenVINO / ncnn); `int8_latency_ms` is an int8 job's measured batch-1
latency (calibrate.py, export.py of a QAT model). `pareto` / `pareto_int8` mark the jobs on the
Pareto front of accuracy against size / int8 latency (`pareto_front`), per data set; tradeoff.png
draws both fronts.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Sequence
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
    "pareto",
    "delta_vs_fp32",
    "params",
    "macs",
    "size_bytes",
    "compression_pct",
    "latency_ms",
    "int8_latency_ms",
    "pareto_int8",
    "epochs",
    "wall_s",
    "metric",  # what test_acc holds: top-1, or a detector's mAP
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
        for key in ("test_acc", "best_test_acc", "map", "best_map", "test_loss", "train_loss"):
            if not _finite(source.get(key)):
                return f"diverged: non-finite {key.replace('_', ' ')}{where}"
    return "ok"


def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _saved_config(run: Path) -> dict[str, Any] | None:
    """The config the run saved: train.py's config.yaml, else Hydra's .hydra/config.yaml."""
    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        cfg = _read_yaml(path)
        if cfg is not None:
            return cfg
    return None


def _config_names(run: Path) -> dict[str, Any]:
    """model / dataset / quant names from the run's saved config, for a run without metrics."""
    cfg = _saved_config(run)
    if cfg is None:
        return {}
    name = {
        k: (cfg.get(k) or {}).get("name") if isinstance(cfg.get(k), dict) else None
        for k in ("model", "dataset", "quant")
    }
    return {k: v for k, v in name.items() if v is not None}


# What each entry point leaves in its run folder: a metrics.json key no other one writes, and
# its output file (calibrate.py and export.py both write ONNX files: their metrics tell them
# apart). Tried in this order; train.py's run may be a pipeline (metrics' or config's `stages`).
JOB_SIGNS = (
    ("prune", ("channels_before",), ("pruned.pt",)),
    ("fuse", ("fold_modes", "bn_after"), ("fused.pt",)),
    ("pack", ("packed_layers",), ("packed.pt",)),
    ("calibrate", ("calib_method",), ()),
    ("export", ("exporter",), ()),
    ("train", ("history", "epochs"), ("best.pt", "last.pt")),
)
JOB_KINDS = tuple(kind for kind, _, _ in JOB_SIGNS)


def _pipeline_kinds(stages: Any) -> str | None:
    """`train+prune+...` from a pipeline's stages: metrics' (dicts with `kind`) or the
    config's `schedule.stages` (kind names, or dicts with `stage`)."""
    if not isinstance(stages, list) or not stages:
        return None
    kinds = [s if isinstance(s, str) else (s.get("kind") or s.get("stage")) for s in stages]
    return "+".join(str(k) for k in kinds) if all(kinds) else None


def _hydra_job_name(run: Path) -> str | None:
    """The entry point Hydra ran (`hydra.job.name` in .hydra/hydra.yaml: the script's name)."""
    hydra = (_read_yaml(run / ".hydra" / "hydra.yaml") or {}).get("hydra")
    job = hydra.get("job") if isinstance(hydra, dict) else None
    return job.get("name") if isinstance(job, dict) else None


def job_kind(run: str | Path, m: dict[str, Any] | None = None) -> str | None:
    """What the job in folder `run` was: `train`, `prune`, `fuse`, `calibrate`, `export` or
    `pack`, or a pipeline's stage kinds (`train+prune+finetune`); None when nothing says.

    Read from its metrics.json (`m`) first, then the entry point Hydra ran (a failed job has
    no metrics), then the files it wrote."""
    run = Path(run)
    if m is not None:
        kinds = _pipeline_kinds(m.get("stages"))
        if kinds:
            return kinds
        for kind, keys, _ in JOB_SIGNS:
            if any(k in m for k in keys):
                return kind
    cfg = _saved_config(run) or {}
    schedule = cfg.get("schedule") if isinstance(cfg.get("schedule"), dict) else {}
    pipeline = _pipeline_kinds(schedule.get("stages"))
    name = _hydra_job_name(run)
    if name in JOB_KINDS:
        return pipeline if name == "train" and pipeline else name
    if (run / "config.yaml").exists():  # only train.py saves one in its run folder
        return pipeline or "train"
    for kind, _, files in JOB_SIGNS:
        if any((run / f).exists() for f in files):
            return kind
    return None


# a deploy job's model file, when its metrics have no size_bytes (the weights' bit widths)
FILE_SIZE_KEYS = ("int8_bytes", "onnx_bytes", "openvino_bytes", "ncnn_bytes")
PTQ_LABEL = "int8_ptq"  # calibrate.py: post-training int8 weights, uint8 activations (ORT)


def _size(m: dict[str, Any]) -> Any:
    if m.get("size_bytes") is not None:
        return m["size_bytes"]
    return next((m[k] for k in FILE_SIZE_KEYS if m.get(k) is not None), None)


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
        row.update(run=str(run.relative_to(root)) or ".", status=status, stages=job_kind(run))
        return row
    stages = m.get("stages") if isinstance(m.get("stages"), list) else []
    kind = job_kind(run, m)
    channels = m.get("channels") or next(
        (s.get("channels") for s in stages if isinstance(s, dict) and s.get("channels")), None
    )
    pruned = channels or m.get("pruned") is True  # calibrate / export say whether it was
    ptq = "quant" not in m and (kind or "").split("+")[-1] == "calibrate"
    return {
        "run": str(run.relative_to(root)) or ".",
        "model": m.get("model"),
        "dataset": m.get("dataset"),
        "quant": PTQ_LABEL if ptq else m.get("quant", "fp32"),
        "w_bits": 8 if ptq else m.get("w_bits", 32),
        "a_bits": 8 if ptq else m.get("a_bits", 32),
        "stages": kind,
        "pruned": "yes" if pruned else "no",
        # a detector's mAP in the accuracy column (metric says which), so a sweep of detectors
        # is compared, plotted and ranked the same way
        "test_acc": m.get("test_acc", m.get("map")),
        "metric": "mAP" if "test_acc" not in m and "map" in m else "top-1",
        "status": status,
        "params": m.get("params"),
        "macs": m.get("macs"),
        "size_bytes": _size(m),
        "latency_ms": m.get("latency_ms"),
        "int8_latency_ms": m.get("latency_ms_bs1_int8"),
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
    # the first fp32, unpruned run; a trained one before a fused or exported one
    baselines: dict[tuple[Any, Any], dict[str, Any]] = {}
    for b in sorted(rows, key=lambda r: r["stages"] != "train"):
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
    for key, column in FRONTS:
        for r in rows:
            r[column] = None
        for r in front_rows(rows, key):
            r[column] = "yes"
    return rows


# (the x of a front: smaller is better, the column marking its jobs); test_acc is the y
FRONTS = (("size_bytes", "pareto"), ("int8_latency_ms", "pareto_int8"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """The indices, ascending, of the non-dominated points of `points` = (cost, gain) pairs:
    cost to minimize (size, latency), gain to maximize (accuracy). A point is dominated when
    another has no higher cost and no lower gain, and is better in one of them; equal points
    do not dominate each other (both are on the front)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(x2 <= x and y2 >= y and (x2 < x or y2 > y) for x2, y2 in points)
    ]


def _plottable(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The finished rows with an accuracy and a positive, finite `key`."""
    return [
        r
        for r in rows
        if r["status"] == "ok"
        and isinstance(r["test_acc"], int | float)
        and math.isfinite(r["test_acc"])
        and isinstance(r.get(key), int | float)
        and math.isfinite(r[key])
        and r[key] > 0
    ]


def front_rows(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The rows on the Pareto front of test accuracy against `key` (size_bytes,
    int8_latency_ms), one front per data set (accuracies of two data sets do not compare)."""
    pts = _plottable(rows, key)
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in pts):
        mine = [r for r in pts if r["dataset"] == dataset]
        out += [mine[i] for i in pareto_front([(r[key], r["test_acc"]) for r in mine])]
    return [r for r in rows if any(r is o for o in out)]


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
    lines += [""]
    for (key, column), what in zip(FRONTS, ("size", "int8 latency"), strict=True):
        if key == "size_bytes" or any(r[column] for r in rows):
            on = ", ".join(r["run"] for r in rows if r[column]) or "none"
            lines.append(f"Pareto front (test accuracy vs {what}): {on}")
    lines += ["", summary(rows)]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    plot_tradeoff(rows, root / "tradeoff.png")
    return rows


def _label(r: dict[str, Any]) -> str:
    label = (r["quant"] or "") + ("+pruned" if r["pruned"] == "yes" else "")
    return label + (f" ({r['stages']})" if r["stages"] not in (None, "train") else "")


def draw_panel(ax: Any, rows: list[dict[str, Any]], key: str, scale: float, xlabel: str) -> list:
    """Test accuracy against `key` / `scale` on `ax`: one labelled point per finished run, and
    the Pareto front (per data set) as a step line with its points ringed. Returns the front
    lines drawn (one per data set)."""
    pts = _plottable(rows, key)
    for model in sorted({str(r["model"]) for r in pts}):
        mine = [r for r in pts if str(r["model"]) == model]
        ax.scatter([r[key] / scale for r in mine], [r["test_acc"] for r in mine], label=model)
        for r in mine:
            ax.annotate(
                _label(r),
                (r[key] / scale, r["test_acc"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    lines = []
    datasets = list(dict.fromkeys(r["dataset"] for r in pts))
    for dataset in datasets:
        front = sorted(
            (r for r in front_rows(pts, key) if r["dataset"] == dataset),
            key=lambda r: (r[key], r["test_acc"]),
        )
        xs, ys = [r[key] / scale for r in front], [r["test_acc"] for r in front]
        name = "Pareto front" + (f" ({dataset})" if len(datasets) > 1 else "")
        # the step line through the front's points, each of them ringed
        (line,) = ax.step(
            xs,
            ys,
            where="post",
            color="0.2",
            lw=1.2,
            label=name,
            zorder=3,
            marker="o",
            ms=11,
            mfc="none",
            mec="crimson",
            mew=1.5,
        )
        lines.append(line)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    return lines


def plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against model size, one labelled point per run, the Pareto front marked;
    a second panel against measured int8 latency when some job has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency = bool(_plottable(rows, "int8_latency_ms"))
    fig, axes = plt.subplots(
        1, 2 if latency else 1, figsize=(12.0 if latency else 6.4, 4.2), dpi=120, squeeze=False
    )
    size_ax = axes[0][0]
    draw_panel(size_ax, rows, "size_bytes", 1024, "weight storage (KiB, log scale)")
    size_ax.set_title("accuracy / size trade-off")
    if latency:
        lat_ax = axes[0][1]
        draw_panel(lat_ax, rows, "int8_latency_ms", 1, "int8 latency, batch 1 (ms, log scale)")
        lat_ax.set_title("accuracy / int8 latency trade-off")
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
