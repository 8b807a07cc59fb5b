"""The detection results table: a detector on cifar10_det, fp32 and every compression mode from
it, on a CPU budget.

    python bench/detection_table.py [--model ssdlite|fcos] [--out DIR] [--epochs N] [--ft N]
                                    [--tiny] [--table PATH]

1. the base: `train.py dataset=cifar10_det model=torchvision_det` (`--model ssdlite`:
   SSDlite320-MobileNet-v3; `fcos`: FCOS on a MobileNet-v3 + 64-channel FPN, the FPN detector
   at a CPU budget), reading 128 px canvases, for `--epochs`;
2. from its last.pt, each with `--ft` finetune epochs: int8 QAT and LSQ W8A8 / W4A4 (inputs
   quantized at every layer), 30% of the MACs pruned by L1 + finetune; PTQ int8
   (`calibrate.py`, no finetune);
3. each exported (`export.py` / `calibrate.py`: the core in ONNX Runtime, decoding and NMS in
   Python): mAP in the runtime, file size, core latency at batch 1 in ONNX Runtime and in
   OpenVINO, each against the base's fp32 in the same runtime.

Every step runs as a user would (the entry points, in subprocesses) and is skipped when its
metrics.json exists, so the table resumes row by row; a failing step is a row that says so. The
table (`--table`, default bench/results/cifar10_det_MODEL.md and .csv) is rewritten after
every row from the runs' own metrics.json, with the machine, date, commit and commands.
`--tiny`: 32 / 16 canvases at 64 px, one epoch, every row (a check that the script runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from cpu_table import COMMANDS, machine, metrics, run_step  # noqa: E402

INT8 = "{name: int8_qat, weight: {kind: int8}, act: {kind: int8, sites: inputs}}"
LSQ = "{{name: w{b}a{b}l, weight: {{kind: lsq, bits: {b}}}, "
LSQ += "act: {{kind: lsq, bits: {b}, sites: inputs}}}}"
# the detector of each --model: its title, model args and base learning rate
MODELS = {
    "ssdlite": ("SSDlite", [], 0.02),
    "fcos": (
        "FCOS (MobileNet-v3 + 64-channel FPN)",
        [
            "model.name=fcos_resnet50_fpn",
            "model.backbone=mobilenet_v3_large",
            "model.fpn_channels=64",
        ],
        0.01,  # GroupNorm heads; torchvision's reference recipe uses 0.01 at batch 16
    ),
}
# (key, name, how it is made from the base, goal: the largest mAP drop that meets it)
ROWS = [
    ("fp32", "fp32 (the base)", "base", None),
    ("int8_qat", "int8 QAT", f"quant={INT8}", 1.0),
    ("w8a8l", "LSQ W8A8", "quant=" + LSQ.format(b=8), 1.0),
    ("w4a4l", "LSQ W4A4", "quant=" + LSQ.format(b=4), 3.0),
    ("pruned30", "30% MACs pruned (L1) + finetune", "prune", 2.0),
    ("ptq_int8", "PTQ int8 (minmax, no finetune)", "ptq", 1.0),
]


def data_args(tiny: bool, out: Path, model: str = "ssdlite") -> list[str]:
    """cifar10_det as built by default (4000 / 1000 canvases), or a tiny one of its own, and
    the model's args."""
    n = ["dataset.num_train=32", "dataset.num_val=16", "dataset.image_size=64"] if tiny else []
    n += [f"dataset.build_dir={out / 'cifar10_det_tiny'}"] if tiny else []
    return ["dataset=cifar10_det", "model=torchvision_det", *MODELS[model][1], *n]


def make_row(key: str, how: str, out: Path, args: argparse.Namespace, log: Path) -> str:
    """Train / prune / calibrate row `key` into out/key and export it; '' or why it failed."""
    common = data_args(args.tiny, out, args.model)
    common += ["schedule.batch_size=16", "schedule.eval_batch_size=16"]
    base = out / "fp32" / "last.pt"
    ft = [f"schedule.epochs={args.ft}", "schedule.lr=0.002", "schedule.lr_schedule=cosine"]
    run = out / key
    if how == "base":
        lr = MODELS[args.model][2]
        base = [f"schedule.epochs={args.epochs}", f"schedule.lr={lr}", "schedule.eval_every=4"]
        steps = [["train.py", *common, *base]]
    elif how == "prune":
        prune = ["prune.py", f"ckpt={base}", "pruner.importance=l1", "pruner.target=macs"]
        if why := run_step([*prune, "pruner.percent=0.3"], run / "prune", log):
            return why
        steps = [["train.py", *common, *ft, f"init_from={run / 'prune' / 'pruned.pt'}"]]
    elif how == "ptq":
        cal = ["calibrate.py", f"ckpt={base}", "calib.batches=8", "calib.batch_size=16"]
        return run_step(cal, run, log)
    else:
        steps = [["train.py", *common, *ft, f"init_from={base}", how]]
    for cmd in steps:
        if why := run_step(cmd, run, log):
            return why
    return export(run / "last.pt", run, log)


def export(ckpt: Path, run: Path, log: Path) -> str:
    """The checkpoint's core in ONNX Runtime (run/export) and in OpenVINO (run/export_ov)."""
    if why := run_step(["export.py", f"ckpt={ckpt}"], run / "export", log):
        return why
    return run_step(["export.py", f"ckpt={ckpt}", "format=openvino"], run / "export_ov", log)


def table_row(key: str, name: str, goal: float | None, out: Path, failed: str) -> dict:
    m = metrics(out / key)
    x = m if key == "ptq_int8" else metrics(out / key / "export")
    ov = {} if key == "ptq_int8" else metrics(out / key / "export_ov")
    base = metrics(out / "fp32")
    base_x, base_ov = metrics(out / "fp32" / "export"), metrics(out / "fp32" / "export_ov")
    row = {"key": key, "mode": name, "status": "failed: " + failed if failed else "ok"}
    if not m:
        return row
    runtime_map = x.get("map_int8", x.get("map_runtime"))
    row |= {
        "mAP": m.get("map", m.get("map_int8")),
        "mAP@.5": m.get("map50"),
        "mAP in ORT": runtime_map,
        "delta": None,
        "goal": f"-{goal}" if goal else "",
        "params": m.get("params"),
        "MACs": m.get("macs"),
        "file bytes": x.get("int8_bytes", x.get("onnx_bytes")),
        "same detections in ORT": _share(x),
        "ORT bs=1 ms": x.get("latency_ms_bs1_int8", x.get("latency_ms_bs1_fp32")),
        "OV bs=1 ms": ov.get("latency_ms_bs1_int8", ov.get("latency_ms_bs1_fp32")),
    }
    if base.get("map") is not None and row["mAP"] is not None and key != "fp32":
        row["delta"] = round(row["mAP"] - base["map"], 2)
        row["met"] = "yes" if goal is not None and row["delta"] >= -goal else "no"
    for rt, ref, src in (("ORT", base_x, x), ("OV", base_ov, ov)):
        # against the fp32 core timed in the same run where it is the base's (QAT and PTQ
        # rows: the same machine load), else the base's own file
        own = src.get("latency_ms_bs1_fp32") if key not in ("fp32", "pruned30") else None
        fp32_ms = own or ref.get("latency_ms_bs1_fp32")
        if fp32_ms and row[f"{rt} bs=1 ms"]:
            row[f"{rt} speed-up"] = round(fp32_ms / row[f"{rt} bs=1 ms"], 2)
    return row


def _share(export: dict) -> str:
    """Val images whose ORT detections match PyTorch's (export.py's check), as 'k / n'."""
    n, k = export.get("images"), export.get("images_same_detections")
    return f"{k} / {n}" if n and k is not None else ""


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    cols = ["mode", "mAP", "mAP@.5", "mAP in ORT", "delta", "goal", "met", "params", "MACs"]
    cols += ["same detections in ORT", "file bytes", "ORT bs=1 ms", "ORT speed-up"]
    cols += ["OV bs=1 ms", "OV speed-up", "status"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["key", *cols], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    mach = machine()

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    lines = [
        f"# {MODELS[args.model][0]} on cifar10_det: fp32 and every compression mode, on a CPU",
        "",
        f"{mach['cpu']}, {mach['cores']} cores ({mach['isa']}), torch {mach['torch']}, "
        f"{mach['date']}, commit {mach['commit']}; base {args.epochs} epochs, finetunes "
        f"{args.ft}; written by bench/detection_table.py --model {args.model}"
        f"{' --tiny' if args.tiny else ''}.",
        "mAP: COCO mAP@[.5:.95] in percent on the val canvases, in PyTorch (fake-quant for QAT) "
        "and in ONNX Runtime (the core exported, decoding and NMS in Python); latency: the core "
        "at batch 1 in ORT and in OpenVINO (speed-up: against the fp32 core in the same runtime, "
        "timed in the same run for the QAT and PTQ rows, the base's for the others; the PTQ "
        "row's file is ORT's own, not run in OpenVINO).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    lines += ["", "Commands:", "", "```", *dict.fromkeys(COMMANDS), "```", ""]
    path.with_suffix(".md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="ssdlite")
    ap.add_argument("--out", default=None, help="default: outputs/det_table[_MODEL]")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ft", type=int, default=3)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--table", default=None, help="default: bench/results/cifar10_det_MODEL")
    args = ap.parse_args(argv)
    if args.tiny:
        args.epochs, args.ft = 1, 1
    suffix = "" if args.model == "ssdlite" else f"_{args.model}"
    out = Path(args.out or ROOT / "outputs" / f"det_table{suffix}")
    table = Path(args.table or ROOT / "bench" / "results" / f"cifar10_det_{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    done = []
    for key, name, how, goal in ROWS:
        print(f"{key}: {name}", flush=True)
        failed = make_row(key, how, out, args, log)
        if key == "fp32" and not failed:  # the base's fp32 file: every speed-up's reference
            failed = export(out / "fp32" / "last.pt", out / "fp32", log)
        done.append(table_row(key, name, goal, out, failed))
        write_table(done, table, args)
    print(json.dumps(done, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
