#!/usr/bin/env bash
# Everything a GPU session owes, one part per call of the device tool (see benchmarks/README.md):
# install with the CUDA extension, run the whole test suite on the GPU, run every benchmark.
# Results land in $OUT (the device tool brings back at most 8 files): JSON per benchmark, one log.
#
#   mkdir -p .carry && cp -r ../shared/golden .carry/     # once, here; .carry/ is git-ignored
#   pip download -d .carry/wheels pytest-benchmark        # once, here: the suite's timer, installed there offline
#   device run, carry [".carry"], command: bash benchmarks/gpu_run.sh [tests|decode|arm|engine|quick|all]
# A device command may run 10 minutes: each part but `all` stops its commands at PART_BUDGET_S
# (7.5 minutes; a command cut short is logged as FAILED with 124) and writes at most 8 files
# (run.log included); call `tests`, `decode`, `arm`, then `engine`. Triton's cache lives in
# .carry/triton-cache, so the parts of one warm machine reuse each other's compiled kernels.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1
export FASTCOMER_GOLDEN_DIR=${FASTCOMER_GOLDEN_DIR:-$PWD/.carry/golden}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.carry/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
what=${1:-all}
budget=${PART_BUDGET_S:-450}
[ "$what" = all ] && budget=100000
status=0
run() {  # run CMD... within what is left of the part's budget, appending its output to the log;
  # a failure (124: out of time) marks the run failed and goes on
  local left=$((budget - SECONDS))
  if [ "$left" -le 10 ]; then echo "== SKIPPED (part budget spent): $*" | tee -a "$LOG"; status=1; return; fi
  echo "== $*" | tee -a "$LOG"
  timeout "$left" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== FAILED with $rc: $*" | tee -a "$LOG"; status=1; }
}

run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# No network there: build with the image's setuptools, pybind11 and ninja.
run env FASTCOMER_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e .
python3 -c "import pytest_benchmark" 2>/dev/null ||
  run python3 -m pip install -q --no-index --find-links .carry/wheels pytest-benchmark
run python3 -m fastcomer env  # into the log: one file fewer
# The suite with CUDA present: the GPU tests run instead of skipping. First what issue 19 found
# by reading the kernels (half models on the Triton step, two searches at once, a model on
# cuda:1 when there are two GPUs), so that a first run exercises it within the budget.
case "$what" in all|tests|quick)
  run python3 -m pytest tests/search/test_gpu_launches.py -q -rs
  run python3 -m pytest tests --ignore=tests/interpreter --ignore=tests/search/test_gpu_launches.py -q -rs ;;
esac
if [ "$what" = quick ]; then
  run python3 -m pytest benchmarks/bench_cross_attention_step.py benchmarks/bench_beam_step.py -k "L256 and (images1 or images8)" --bench-out "$OUT/steps.json"
  run python3 -m fastcomer bench --device cuda --quick --out "$OUT/engine_1image.json"
fi
if [ "$what" = all ] || [ "$what" = decode ]; then
  run python3 -m pytest benchmarks/bench_cross_attention_step.py benchmarks/bench_beam_step.py --bench-out "$OUT/steps.json"
fi
if [ "$what" = all ] || [ "$what" = arm ]; then
  run python3 -m pytest benchmarks/bench_arm_attention.py --bench-out "$OUT/arm_attention.json"
  run python3 -m pytest benchmarks/bench_arm_attention.py --train --bench-out "$OUT/arm_attention_train.json"
fi
if [ "$what" = all ] || [ "$what" = engine ]; then
  run python3 -m fastcomer bench --device cuda --shape 128x512 --shape 256x1024 --out "$OUT/engine_1image.json"
  # the torch engine (plain step, no graphs) against the same reference
  run python3 -m fastcomer bench --device cuda --shape 128x512 --backend torch --graphs off --out "$OUT/engine_torch_1image.json"
  run python3 -m fastcomer bench --device cuda --shape 128x512 --images 16 --batch 16 --out "$OUT/engine_16images.json"
fi
exit $status
