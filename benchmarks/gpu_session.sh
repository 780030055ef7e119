#!/usr/bin/env bash
# One device call: the gpu test tier, then every benchmark, logs under $OUT (at most 8 files come back).
#   usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [tests|bench|all] [bench names...]
set -uo pipefail
OUT=${OUT:-/tmp/moecomm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOECOMM_CACHE_DIR=${MOECOMM_CACHE_DIR:-/tmp/moecomm-cache}
# FlashInfer as a peer (bench_gemm), when its wheel was carried in .whl/ (../shared/tools/build-flashinfer-wheel.sh)
if ls .whl/flashinfer_python-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi-site .whl/flashinfer_python-*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/fi-site" FLASHINFER_CUDA_ARCH_LIST=9.0
fi
what=${1:-all}; shift || true
benches=${*:-"routing permute gemm moe dispatch"}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# the GPU's clock, power and throttle reasons every 250 ms while this runs (to read timings against)
smi_q=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active
nvidia-smi --query-gpu=$smi_q --format=csv -lms 250 > "$OUT/smi.csv" 2>/dev/null &
smi_pid=$!
trap 'kill $smi_pid 2>/dev/null' EXIT
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout 420 python3 -m pytest -q -m "gpu" -p no:cacheprovider --timeout=300 tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in $benches; do
    echo "=== bench_$b $(date -u +%T) ===" | tee -a "$OUT/bench.log"
    timeout ${BENCH_TIMEOUT:-240} python3 -m benchmarks.bench_$b --out "$OUT/results.jsonl" 2>&1 | tee -a "$OUT/bench.log" | tail -60
  done
  echo "=== profile_moe ===" | tee -a "$OUT/bench.log"
  timeout 150 python3 -m benchmarks.profile_moe --tokens 1 64 4096 2>&1 | grep -v Warn | tee -a "$OUT/bench.log" | grep -e "---"
  # the launch configs the tuner picked (bench figures read against them)
  cat "$MOECOMM_CACHE_DIR"/gemm/*.json > "$OUT/gemm-configs.json" 2>/dev/null
fi
