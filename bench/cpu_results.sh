#!/usr/bin/env bash
# Every number in the README's Results section, measured in one go on this machine's CPU.
# Writes logs and tables into ${OUT:-outputs/bench}; takes about 2 hours on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/bench}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
export COMPRESS_DATA_DIR=${COMPRESS_DATA_DIR:-data}
step() { echo "== $1 $(date +%H:%M:%S)" | tee -a "$OUT/progress.log"; }

step quickstart
/usr/bin/time -v $PY train.py experiment=quickstart schedule.progress=false \
  hydra.run.dir="$OUT/quickstart" > "$OUT/quickstart.log" 2>&1
step train_speed
$PY bench/train_speed.py --models resnet9,resnet20,nin,nin_gc,vgg_small --batch 64 > "$OUT/train_speed.md" 2>&1
step quant_overhead
$PY bench/quant_overhead.py > "$OUT/quant_overhead.md" 2>&1
step prune_speed
$PY bench/prune_speed.py > "$OUT/prune_speed.md" 2>&1
$PY bench/prune_speed.py --compile > "$OUT/prune_speed_compiled.md" 2>&1
step fuse_speed
$PY bench/fuse_speed.py --models nin,nin_gc,resnet20,vgg_small > "$OUT/fuse_speed.md" 2>&1
step fuse_quickstart
$PY fuse.py ckpt="$OUT/quickstart/best.pt" hydra.run.dir="$OUT/fuse_quickstart" > "$OUT/fuse_quickstart.log" 2>&1
step quant_sweep
$PY train.py -m experiment=quant_cpu quant=fp32,w8a8,w4a4,w2a2,wba32,wta32,wbab,wtab,w8a8p,w4a4p,w2a2p \
  schedule.progress=false hydra.sweep.dir="$OUT/quant_sweep" > "$OUT/quant_sweep.log" 2>&1
step qat_finetune
$PY train.py -m experiment=qat_finetune_cpu init_from="$OUT/quickstart/best.pt" \
  quant=fp32,w8a8,w4a4,w2a2,wbab,wtab,w8a8p,w4a4p,w2a2p schedule.progress=false \
  hydra.sweep.dir="$OUT/qat_finetune" > "$OUT/qat_finetune.log" 2>&1
step slimming
$PY train.py experiment=slim_cpu schedule.progress=false hydra.run.dir="$OUT/slim" > "$OUT/slim.log" 2>&1
step done
