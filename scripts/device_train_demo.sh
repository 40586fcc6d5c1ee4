#!/usr/bin/env bash
# One device call of the demo-model recipe (two of these, back to back, make the full run):
#   bash scripts/device_train_demo.sh 1    # renders, trains the VAE and the first part of the flow
#   bash scripts/device_train_demo.sh 2    # resumes, finishes the flow, exports and evaluates
# The work dir runs/demo is git-ignored, so it survives between two calls on the same (warm)
# machine; a call 2 that finds no state (a fresh machine) trains a complete one-run recipe instead.
# Results go to $OUT: the log, results.tar.gz (loss curve, metrics, sample grids) and the exported pipeline as a
# tar split into 15 MB parts (the device tool returns files of at most 16 MB).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nunchaku_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source benchmarks/device_wheels.sh  # the carried wheels (diffusers, ...) on PYTHONPATH
WORK=runs/demo
RUN=${1:-1}
BUDGET=18.5
OVERHEAD=300  # call 2's start-up (render, encode, compile) and the export + evaluation at its end
if [ "$RUN" = 2 ] && [ ! -f "$WORK/state.pt" ]; then
  echo "no state from call 1 on this machine: training a one-run recipe (9 minutes) instead"
  BUDGET=9
  OVERHEAD=120
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.log"
python3 scripts/train_demo_model.py --work-dir "$WORK" --budget-minutes "$BUDGET" --max-minutes 9 \
  --overhead-seconds "$OVERHEAD" --vae-steps 2000 2>&1 | tee "$OUT/train_run$RUN.log"
(cd "$WORK" && ls loss.csv loss.png metrics.json samples_cfg* 2>/dev/null | tar czf "$OUT/results.tar.gz" -T -)
if [ -d "$WORK/pipeline" ]; then
  tar czf - -C "$WORK" pipeline | split -b 15M - "$OUT/pipeline.tar.gz.part-"
fi
ls -la "$OUT"
