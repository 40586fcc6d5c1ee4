#!/usr/bin/env bash
# One device call for the FLUX.1 12B-shape benchmarks: install the carried wheels (diffusers,
# torchao, ...), build nunchaku._C, run benchmarks/flux_step.py (or, with "pipeline" first,
# benchmarks/pipeline.py); log and JSON to $OUT.
#   bash benchmarks/device_flux.sh [flux_step.py arguments]
#   bash benchmarks/device_flux.sh pipeline [pipeline.py arguments]
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nunchaku_out}
mkdir -p "$OUT"
export MAX_JOBS=16 PYTHONUNBUFFERED=1
source benchmarks/device_wheels.sh  # the carried wheels (diffusers, ...) on PYTHONPATH
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/env.log"
# A warm machine keeps the extension built by an earlier call (NUNCHAKU_REUSE_BUILD=1 reuses it).
if [ "${NUNCHAKU_REUSE_BUILD:-0}" != 1 ] || ! ls nunchaku/_C*.so >/dev/null 2>&1; then
  python3 benchmarks/build_ext.py > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
BENCH=flux_step
if [ "${1:-}" = pipeline ]; then BENCH=pipeline; shift; fi
python3 "benchmarks/$BENCH.py" --json "$OUT/$BENCH.json" "$@" 2>&1 | grep -v "quantizing:" | tee "$OUT/$BENCH.log"
