#!/usr/bin/env bash
# The results table (README "Results"): ResNet-20 on CIFAR-10, every compression mode from one
# fp32 base, measured on this machine's CPU; resumable row by row (rerun the same command).
#   bash bench/cpu_table.sh                      # the whole table (hours on 2 cores)
#   nohup bash bench/cpu_table.sh > outputs/cpu_table.log 2>&1 &
#   bash bench/cpu_table.sh --tiny --out /tmp/t --table /tmp/t/table.md   # a check of about 4 minutes
#   bash bench/cpu_table.sh --base RUN_DIR --ft 3 --only w4a4l,ptq_minmax
# Options: python bench/cpu_table.py --help. Needs data/cifar-10-batches-py (make data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec "$PY" bench/cpu_table.py "$@"
