#!/usr/bin/env bash
# The full-length results table on one lent GPU (about 8 minutes on an H100 / H200).
#   device run:  bash bench/gpu.sh            (carry: .whl data)
#   CPU check:   bash bench/gpu.sh --tiny     (1 epoch per recipe on synthetic data)
# Needs CIFAR-10 under $COMPRESS_DATA_DIR (default data/, carried to the device) and Hydra:
# the device image has torch but not Hydra, so the wheels in .whl/ (copied from
# ../shared/wheels) are installed first when Hydra is missing. Writes $OUT/gpu_table.md
# (or outputs/gpu/gpu_table.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(command -v .venv/bin/python || command -v python3)}
if ! "$PY" -c "import hydra" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export COMPRESS_DATA_DIR=${COMPRESS_DATA_DIR:-data} PYTHONUNBUFFERED=1
"$PY" bench/gpu_table.py --out "${OUT:-outputs/gpu}" "$@"
