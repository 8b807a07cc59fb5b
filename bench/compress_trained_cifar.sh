#!/usr/bin/env bash
# The "compress a model you already trained" flow on real CIFAR-10, on the quick start's model:
#   1. train ResNet-9 w16 as `make demo` does (experiment=quickstart), keep only its state_dict
#      (as if it came from someone else's script);
#   2. experiment=compress_trained from that file: L1 prune to half the MACs -> finetune with KD
#      -> LSQ W4A4 with KD -> integer ONNX in ONNX Runtime;
#   3. controls from the same file: LSQ W4A4 without pruning, with and without KD.
# Usage: bash bench/compress_trained_cifar.sh [OUT=outputs/compress_trained_cifar] (data/ or
# $COMPRESS_DATA_DIR must hold cifar-10-batches-py). Each step is skipped when its metrics exist.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/compress_trained_cifar}
PY=${PY:-.venv/bin/python}
FT=${FT:-2}   # finetune epochs
QE=${QE:-3}   # quantize epochs
common=(dataset=cifar10 schedule.progress=false device=cpu)
run() { local dir=$1; shift; [ -f "$dir/metrics.json" ] || "$PY" train.py "${common[@]}" "$@" hydra.run.dir="$dir"; }
run "$OUT/base" experiment=quickstart
"$PY" -c "import torch,sys; s=torch.load(sys.argv[1], weights_only=True); torch.save(s['model'], sys.argv[2])" \
  "$OUT/base/best.pt" "$OUT/base_state_dict.pth"
opt=(model=resnet9 schedule.batch_size=256 schedule.channels_last=true schedule.label_smoothing=0.2)
run "$OUT/recipe" experiment=compress_trained "${opt[@]}" init_from="$OUT/base_state_dict.pth" \
  "schedule.stages=[prune,{stage: finetune, epochs: $FT, quant: {name: fp32, weight: {kind: fp32}, act: {kind: fp32}}},{stage: quantize, epochs: $QE, lr: 0.005},{stage: export, format: onnx, latency: false}]"
run "$OUT/w4a4l_kd" "${opt[@]}" init_from="$OUT/base_state_dict.pth" quant=w4a4l distill=kd schedule.epochs=$QE schedule.lr=0.005
run "$OUT/w4a4l" "${opt[@]}" init_from="$OUT/base_state_dict.pth" quant=w4a4l schedule.epochs=$QE schedule.lr=0.005
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [("base (quickstart, fp32)", out / "base")]
rows += [(f"recipe: {s.name}", s) for s in sorted((out / "recipe").glob("0*"))]
rows += [("w4a4l + KD, unpruned", out / "w4a4l_kd"), ("w4a4l, unpruned, no KD", out / "w4a4l")]
print("| run | test acc | MACs | params | wall s |\n|---|---:|---:|---:|---:|")
for name, d in rows:
    m = json.loads((d / "metrics.json").read_text())
    acc = m.get("test_acc") if "test_acc" in m else m.get("onnx_acc")
    print(f"| {name} | {acc} | {m.get('macs', '')} | {m.get('params', '')} | {round(m.get('wall_s', 0))} |")
PY
