#!/usr/bin/env bash
# One device call: the gpu test tier, then the benchmarks, logs under $OUT (at most 8 files come back).
#   usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh [tests|bench|compare|compare_ep|all] [bench names...]
#   compare: the layer's kernel, graph-replay and host time (profile_moe) for the tree in $BASE_TREE
#            (default .base, an unpacked earlier commit) and this tree, in turn A B A B: the A-A
#            spread is the control row that says how much of a difference is noise.
#   compare_ep: the same A B A B for the EP dispatcher's host time (profile_dispatch --host), not in "all".
#   ab_sampling: sample.cu trials against a base copy, interleaved in one process (profile_sampling
#            --base-source: base, trial, base; tokens checked equal), then tests/sampling's gpu tier;
#            not in "all". Paths under kernels/: BASE_SOURCE (default sampling/_base_sample.cu, e.g. made
#            by `git show main:kernels/sampling/sample.cu > kernels/sampling/_base_sample.cu`), SOURCES
#            (default the package's sampling/sample.cu); ROWS: profile_sampling's --rows.
#   BENCH_TIMEOUT (s, default 240) bounds each benchmark; BENCH_ARGS are added to each benchmark's
#   arguments (with one bench named); TESTS (default "tests") the gpu tier's paths; FI_SAMPLING
#   (default "072 031") the carried FlashInfer versions bench_sampling runs beside, one process each.
set -uo pipefail
OUT=${OUT:-/tmp/moecomm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOECOMM_CACHE_DIR=${MOECOMM_CACHE_DIR:-/tmp/moecomm-cache}
# FlashInfer 0.3.1 as a peer (bench_gemm), when its wheel was carried in .whl/ (../shared/tools/build-flashinfer-wheel.sh)
if ls .whl/flashinfer_python-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fi-site .whl/flashinfer_python-*.whl \
    && export FI031_SITE=/tmp/fi-site FLASHINFER_CUDA_ARCH_LIST=9.0
fi
# FlashInfer 0.7.2 precompiled for sm_90a, when ../shared/peers/flashinfer-0.7.2 was carried as .fib/
if ls .fib/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fisite .fib/*.whl \
    && for t in .fib/*.tar.xz; do tar xJf "$t" -C /tmp/fisite; done && export FI072_SITE=/tmp/fisite FLASHINFER_CUDA_ARCH_LIST=9.0
fi
what=${1:-all}; shift || true
benches=${*:-"routing permute gemm moe dispatch dispatch_onerank ll_dispatch allreduce attention sampling"}
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
  # the FlashInfer peers stay off the tests' path (0.3.1 first: bench_gemm's peer)
  timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -rfE --durations=20 -m "gpu" -p no:cacheprovider --timeout=300 ${TESTS:-tests} 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -40
fi
if [ "$what" = compare ] || [ "$what" = all ]; then
  base=${BASE_TREE:-.base}
  for round in 1 2; do
    for tree in "$base" .; do
      echo "=== profile_moe tree=$tree round=$round $(date -u +%T) ===" | tee -a "$OUT/compare.log"
      (cd "$tree" && PYTHONPATH="$PWD" MOECOMM_CACHE_DIR=/tmp/moecomm-cache-$(basename "$tree") \
        timeout 150 python3 -m benchmarks.profile_moe --tokens 1 64 4096 2>&1) | grep -e "---" | tee -a "$OUT/compare.log"
    done
  done
fi
if [ "$what" = compare_ep ]; then
  base=${BASE_TREE:-.base}
  for round in 1 2; do
    for tree in "$base" .; do
      echo "=== profile_dispatch --host tree=$tree round=$round $(date -u +%T) ===" | tee -a "$OUT/compare-ep.log"
      (cd "$tree" && PYTHONPATH="$PWD" MOECOMM_CACHE_DIR=/tmp/moecomm-cache-$(basename "$tree") \
        timeout 150 python3 -m benchmarks.profile_dispatch --host 2>&1) \
        | grep -E "^ \[|round trip host|alone|Template.run|for_call|_phase" | tee -a "$OUT/compare-ep.log"
    done
  done
fi
if [ "$what" = ab_sampling ]; then
  for src in ${SOURCES:-sampling/sample.cu}; do
    echo "=== profile_sampling $src vs ${BASE_SOURCE:-sampling/_base_sample.cu} $(date -u +%T) ===" | tee -a "$OUT/ab-sampling.log"
    timeout ${BENCH_TIMEOUT:-240} python3 -m benchmarks.profile_sampling --source "$src" \
      --base-source "${BASE_SOURCE:-sampling/_base_sample.cu}" ${ROWS:+--rows "$ROWS"} 2>&1 | tee -a "$OUT/ab-sampling.log"
  done
  timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -rfE -m "gpu" -p no:cacheprovider --timeout=300 tests/sampling 2>&1 \
    | tee "$OUT/gpu-tests.log" | tail -20
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for b in $benches; do
    echo "=== bench_$b $(date -u +%T) ===" | tee -a "$OUT/bench.log"
    sites=""
    [ "$b" = gemm ] && sites=${FI031_SITE:-}
    # bench_sampling times the flashinfer it imports: once a version carried (FI_SAMPLING: which, in turn)
    if [ "$b" = sampling ]; then
      for v in ${FI_SAMPLING:-072 031}; do
        [ "$v" = 072 ] && sites="$sites ${FI072_SITE:-}"
        [ "$v" = 031 ] && sites="$sites ${FI031_SITE:-}"
      done
    fi
    sites=$(echo $sites)  # " " when neither was carried
    for site in ${sites:-none}; do
      [ "$site" = none ] && site=""
      [ -n "$site" ] && echo "--- flashinfer from $site ---" | tee -a "$OUT/bench.log"
      PYTHONPATH="$PYTHONPATH${site:+:$site}" timeout ${BENCH_TIMEOUT:-240} python3 -m benchmarks.bench_$b --out "$OUT/results.jsonl" ${BENCH_ARGS:-} 2>&1 \
        | tee -a "$OUT/bench.log" | tail -60
    done
  done
  # the launch configs the tuner picked (bench figures read against them)
  cat "$MOECOMM_CACHE_DIR"/gemm/*.json > "$OUT/gemm-configs.json" 2>/dev/null
fi
