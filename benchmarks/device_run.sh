#!/usr/bin/env bash
# One device call: build nunchaku._C for sm_90a, smoke-test, run the GPU tests, benchmark
# (benchmarks/gemm.py: the W4A4 layer; benchmarks/w4a16.py: the W4A16 kernels).
# Logs go to $OUT (the device tool brings that folder back, also when a step fails).
# Usage (repo root, on the GPU machine):
#   bash benchmarks/device_run.sh [--quick] [--no-tests] [--no-bench] [--ncu] [--ncu-source] [--ablate]
# --ncu-source: per-SASS-instruction warp stall samples of one kernel launch ($OUT/<kernel>_source.csv
#   and a top-40 summary): NUNCHAKU_NCU_KERNELS (regexes, default "w4a4_gemm") at NUNCHAKU_NCU_SHAPE
#   ("M K N", default "4608 3072 3072"); several kernels: NUNCHAKU_NCU_KERNELS="w4a4_gemm quantize_act";
#   NUNCHAKU_NCU_POW2=1 profiles the pow2 activation format's kernels instead.
#   NUNCHAKU_AB="name=SPEC ..." bash benchmarks/device_run.sh ...   (A/B of the GEMM and the quantizer alone)
# NUNCHAKU_AB lists other builds to time against the tree's in the same call (gemm.py --gemm-only --pow2 --quant at
# M = 256, 1024, 4608, or NUNCHAKU_AB_MS; other gemm.py arguments in NUNCHAKU_AB_ARGS, e.g.
# "--quant-only --pow2"): SPEC is comma-separated -D flags (e.g. -DNUNCHAKU_GEMM_CLUSTER_M=1) or
# @DIR, another copy of csrc/ (e.g. `git archive` of an older commit, carried in an ignored folder).
# They build in the background while the tests run.
# Carry `.whl` (pytest, diffusers and their dependencies' wheels): they are installed first.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/nunchaku_out}
mkdir -p "$OUT"
export MAX_JOBS=16 PYTHONUNBUFFERED=1
BENCH_ARGS=()
RUN_TESTS=1
RUN_NCU=0
RUN_NCU_SOURCE=0
RUN_BENCH=1
for a in "$@"; do
  case "$a" in
    --quick) BENCH_ARGS+=(--quick) ;;
    --no-tests) RUN_TESTS=0 ;;
    --ncu) RUN_NCU=1 ;;
    --ncu-source) RUN_NCU_SOURCE=1 ;;
    --no-bench) RUN_BENCH=0 ;;
    # Ablations (wrong results, timing only) are A/B builds with the switches of gemm_mainloop.cuh.
    --ablate) NUNCHAKU_AB="${NUNCHAKU_AB:-} no_unpack=-DNUNCHAKU_ABLATE_UNPACK no_promote=-DNUNCHAKU_ABLATE_PROMOTE neither=-DNUNCHAKU_ABLATE_UNPACK,-DNUNCHAKU_ABLATE_PROMOTE" ;;
  esac
done

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  nvcc --version | tail -1
} 2>&1 | tee "$OUT/env.log"

source benchmarks/device_wheels.sh  # the carried wheels (diffusers, ...) on PYTHONPATH

AB_NAMES=()
for v in ${NUNCHAKU_AB:-}; do
  name=${v%%=*}; spec=${v#*=}; AB_NAMES+=("$name")
  if [[ $spec == @* ]]; then src=${spec#@}; defs=""; else src=csrc; defs=${spec//,/ }; fi
  ( NUNCHAKU_CSRC_DIR=$src NUNCHAKU_NVCC_DEFINES="$defs" NUNCHAKU_BUILD_DIR="build/_C_ab_$name" NUNCHAKU_NO_INSTALL=1 \
      MAX_JOBS=8 python3 benchmarks/build_ext.py > "$OUT/build_ab_$name.log" 2>&1 || echo "A/B build $name failed" ) &
done

python3 benchmarks/build_ext.py 2>&1 | tee "$OUT/build.log" | grep -E "error|warning|ptxas info|spill|built " | grep -v "Compile time" | tail -40
if [ "${PIPESTATUS[0]}" -ne 0 ] || ! ls nunchaku/_C*.so >/dev/null 2>&1; then
  echo "BUILD FAILED"; grep -B2 -A8 -E "error" "$OUT/build.log" | head -60; exit 1
fi
SO=$(ls nunchaku/_C*.so | head -1)
cuobjdump -sass "$SO" > /tmp/sass_all.txt 2>&1
# Keep the bf16 GEMM and the bf16 signed rank-32 quantizer only (the whole dump is large).
awk '/Function : /{keep = ($0 ~ /w4a4_gemm_kernelILb1E/ || $0 ~ /quantize_act_kernelILb1ELb0ELi2E/)} keep' /tmp/sass_all.txt > "$OUT/sass.txt"
{ echo "== SASS instruction mix of $SO"; grep -oE "\b(QGMMA|HGMMA|IGMMA|HMMA|UTMALDG|UBLKCP|USETMAXREG|LDL|STL)[A-Z0-9._]*" /tmp/sass_all.txt | sort | uniq -c; } 2>&1 | tee -a "$OUT/env.log"

# A hang (barrier deadlock) must not eat the whole call: smoke test under a short timeout.
timeout 90 python3 - <<'PY' 2>&1 | tee "$OUT/smoke.log"
import torch
from nunchaku.ops import sm90
from nunchaku.ops.sm90_layout import pack_weights_sm90, reference_quantize_act_sm90, reference_gemm_sm90
from nunchaku.ops.sm90_layout import reference_quantize_act_pow2_sm90
torch.manual_seed(0)
for (m, k, n) in [(128, 128, 128), (200, 192, 256), (4608, 3072, 3072)]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    smooth = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    ld = (torch.randn(k, 32, device="cuda") / k**0.5).bfloat16()
    lu = (torch.randn(n, 32, device="cuda") * 0.1).bfloat16()
    bias = torch.randn(n, device="cuda").bfloat16()
    wp, wsp = pack_weights_sm90(torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int8),
                                (torch.rand(n, k // 64, device="cuda") * 0.02 + 0.001).bfloat16())
    c, s, la = sm90.w4a4_quantize_act_sm90(x, smooth, ld)
    torch.cuda.synchronize()
    rc, rs, rl = reference_quantize_act_sm90(x, smooth, ld)
    print(f"quant m={m} k={k}: code mismatches {(c.float() != rc.float()).sum().item()}, "
          f"scale max diff {(s - rs).abs().max().item():.3e}, lora rel {((la - rl).norm() / rl.norm()).item():.3e}")
    y = sm90.w4a4_gemm_sm90(rc, rs, wp, wsp, rl, lu, bias)
    torch.cuda.synchronize()
    ref = reference_gemm_sm90(rc, rs, wp, wsp, rl, lu, bias, exact=True)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    err_round = ((ref.bfloat16().double() - ref).norm() / ref.norm()).item()
    print(f"gemm m={m} k={k} n={n}: rel err {err:.3e} (bf16 rounding alone {err_round:.3e}), finite {torch.isfinite(y).all().item()}")
    c2, s2, la2 = sm90.w4a4_quantize_act_pow2_sm90(x, smooth, ld)
    torch.cuda.synchronize()
    rc2, rs2, _ = reference_quantize_act_pow2_sm90(x, smooth, ld)
    y2 = sm90.w4a4_gemm_sm90(rc2, rs2, wp, wsp, rl, lu, bias)
    ref2 = reference_gemm_sm90(rc2, rs2, wp, wsp, rl, lu, bias, exact=True)
    print(f"pow2 m={m} k={k} n={n}: code mismatches {(c2 != rc2).sum().item()}, scales equal {torch.equal(s2, rs2)}, "
          f"gemm rel err {((y2.double() - ref2).norm() / ref2.norm()).item():.3e}")
PY
SMOKE_RC=$?
if [ "$SMOKE_RC" -ne 0 ]; then echo "SMOKE FAILED rc=$SMOKE_RC"; exit 1; fi

# Argument checks must raise RuntimeError, not crash: probe each in its own process.
for probe in gemm_wscales gemm_wscales_dtype gemm_dtype quant_k quant_rank; do
  timeout 60 python3 - "$probe" <<'PY' 2>&1 | tail -2 | tee -a "$OUT/smoke.log"
import sys, torch
from nunchaku.ops import sm90
from nunchaku.ops.sm90_layout import pack_weights_sm90
sm90.load_extension()
probe = sys.argv[1]
x = torch.randn(8, 256, device="cuda").bfloat16()
smooth = torch.ones(256, device="cuda").bfloat16()
ld = torch.randn(256, 32, device="cuda").bfloat16()
wp, wsp = pack_weights_sm90(torch.zeros(128, 256, dtype=torch.int8, device="cuda"),
                            torch.ones(128, 4, device="cuda", dtype=torch.bfloat16))
c, s, la = sm90.w4a4_quantize_act_sm90(x, smooth, ld)
lu = torch.randn(128, 32, device="cuda").bfloat16(); b = torch.zeros(128, device="cuda").bfloat16()
out = torch.empty(8, 128, device="cuda").bfloat16()
try:
    if probe == "gemm_wscales":
        torch.ops.nunchaku.w4a4_gemm_sm90(c, s, wp, wsp[:2], la, lu, b, 128, out)
    elif probe == "gemm_wscales_dtype":
        torch.ops.nunchaku.w4a4_gemm_sm90(c, s, wp, wsp.half(), la, lu, b, 128, out)
    elif probe == "gemm_dtype":
        torch.ops.nunchaku.w4a4_gemm_sm90(c, s, wp, wsp, la, lu.half(), b, 128, out)
    elif probe == "quant_k":
        torch.ops.nunchaku.w4a4_quantize_act_sm90(x[:, :100], smooth[:100], ld[:100], False, c[:, :100], s, la)
    elif probe == "quant_rank":
        torch.ops.nunchaku.w4a4_quantize_act_sm90(x, smooth, ld[:, :24].contiguous(), False, c, s, la)
    print(f"probe {probe}: no error raised")
except RuntimeError as e:
    print(f"probe {probe}: RuntimeError: {str(e).splitlines()[0][:150]}")
PY
  echo "probe $probe rc=${PIPESTATUS[0]}" | tee -a "$OUT/smoke.log"
done

if [ "$RUN_TESTS" -eq 1 ]; then
  # The argument-check test runs in its own process: a crash there must not hide the others.
  # The pow2 tests first: a quick failure there shows before the long run.
  timeout 150 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/gpu/test_w4a4_sm90_pow2.py -k "not rejects" \
    2>&1 | tee "$OUT/tests_pow2.log" | tail -15
  timeout 400 python3 -m pytest -q --maxfail=5 -p no:cacheprovider tests/gpu -k "not rejects" \
    --ignore=tests/gpu/test_w4a4_sm90_pow2.py 2>&1 | tee "$OUT/tests.log" | tail -25
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_w4a4_sm90.py tests/gpu/test_w4a4_sm90_pow2.py \
    tests/gpu/test_w4a4_sm80.py -k "rejects" 2>&1 | tee -a "$OUT/tests.log" | tail -3
fi

if [ "$RUN_NCU" -eq 1 ]; then
  # Last launches of each kernel (after warm-up), full section set, as text.
  timeout 240 ncu --target-processes all -k regex:"w4a4_gemm|quantize_act" --launch-skip 2 --launch-count 2 \
    --set full --print-details all python3 benchmarks/gemm.py --profile 4608 3072 3072 > "$OUT/ncu.txt" 2>&1
  grep -E "w4a4_gemm|quantize_act|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Issue Slots Busy|Shared Memory|L1/TEX Hit|Bank" "$OUT/ncu.txt" | head -60
fi

if [ "$RUN_NCU_SOURCE" -eq 1 ]; then
  read -r -a NCU_SHAPE <<< "${NUNCHAKU_NCU_SHAPE:-4608 3072 3072}"
  for kernel in ${NUNCHAKU_NCU_KERNELS:-w4a4_gemm}; do
    timeout 240 ncu --target-processes all -k "regex:$kernel" --launch-skip 2 --launch-count 1 --set full \
      -o "/tmp/prof_$kernel" -f python3 benchmarks/gemm.py --profile "${NCU_SHAPE[@]}" ${NUNCHAKU_NCU_POW2:+--pow2} \
      > "$OUT/ncu_${kernel}_run.log" 2>&1
    ncu -i "/tmp/prof_$kernel.ncu-rep" --page source --csv --print-source sass > "$OUT/${kernel}_source.csv" 2>> "$OUT/ncu_source_err.log"
    ncu -i "/tmp/prof_$kernel.ncu-rep" --page details --print-details all > "$OUT/ncu_${kernel}_details.txt" 2>&1
    echo "== $kernel at M K N = ${NCU_SHAPE[*]}"
    python3 benchmarks/ncu_source_summary.py "$OUT/${kernel}_source.csv" 2>&1 | tee "$OUT/ncu_${kernel}_summary.txt" | head -70
    grep -E "Duration|Issue Slots Busy|Eligible Warps|Active Warps Per|Achieved Occupancy|Registers Per|Block Limit|DRAM Throughput|Waves Per SM" \
      "$OUT/ncu_${kernel}_details.txt" | head -14
  done
fi

if [ "$RUN_BENCH" -eq 1 ]; then
  timeout 400 python3 benchmarks/gemm.py "${BENCH_ARGS[@]}" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | grep -E "^\||unavailable|Error|error"
  timeout 200 python3 benchmarks/w4a16.py --json "$OUT/w4a16.json" 2>&1 | tee "$OUT/w4a16.log" | grep -E "^\||T5|Error|error"
fi

if [ "${#AB_NAMES[@]}" -gt 0 ]; then
  wait  # the A/B builds
  SO=$(ls nunchaku/_C*.so | head -1)
  cp "$SO" /tmp/tree_C.so
  ab_run() {  # $1: the build's name; times whatever library is installed now
    echo "== A/B: $1"
    timeout 260 python3 benchmarks/gemm.py ${NUNCHAKU_AB_ARGS:---gemm-only --check --pow2 --quant} \
      --ms ${NUNCHAKU_AB_MS:-256 1024 4608}
  }
  ab_run tree 2>&1 | tee "$OUT/ab.log"
  for name in "${AB_NAMES[@]}"; do
    if [ -f "build/_C_ab_$name/_C.so" ]; then
      cp "build/_C_ab_$name/_C.so" "$SO"
      ab_run "$name" 2>&1 | tee -a "$OUT/ab.log"
    else
      echo "== A/B: $name: no library (see build_ab_$name.log)" | tee -a "$OUT/ab.log"
    fi
  done
  cp /tmp/tree_C.so "$SO"
  python3 - "$OUT/ab.log" <<'PY'
import re, sys
runs, cur = {}, None
for line in open(sys.argv[1]):
    if line.startswith("== A/B: "):
        cur = line[8:].strip(); runs[cur] = {}
    m = re.match(r"(gemm|quant)-only( pow2)? M=(\d+) K=(\d+) N=([\d-]+): ([\d.]+) us", line)
    if m and cur:
        runs[cur][(m.group(1), "pow2" if m.group(2) else "int4") + m.groups()[2:5]] = float(m.group(6))
names = list(runs)
shapes = list(runs.get("tree", {}))
print("| kernel | format | M | K | N | " + " | ".join(f"{n} µs" for n in names) + " |")
print("|" + "---|" * (5 + len(names)))
for sh in shapes:
    print("| " + " | ".join(sh) + " | " + " | ".join(f"{runs[n].get(sh, float('nan')):.1f}" for n in names) + " |")
PY
fi
