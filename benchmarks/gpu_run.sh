#!/usr/bin/env bash
# Everything a GPU session owes, in one call of the device tool (see the README's "GPU runs"):
# install with the CUDA extension, run the whole test suite on the GPU, run every benchmark.
# Results land in $OUT (the device tool brings them back), logs included.
#
#   mkdir -p .carry && cp -r ../shared/golden .carry/     # once, here; .carry/ is git-ignored
#   device run, carry [".carry"], command: bash benchmarks/gpu_run.sh [quick]
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FASTCOMER_GOLDEN_DIR=${FASTCOMER_GOLDEN_DIR:-$PWD/.carry/golden}
quick=${1:-}
status=0
step() { echo "== $*"; "$@" || { echo "== FAILED ($?): $*"; status=1; }; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  # No network there: build with the image's setuptools, pybind11 and ninja.
  step env FASTCOMER_CUDA=1 python3 -m pip install -q --no-build-isolation --no-deps -e .
  step python3 -m fastcomer env --json
} 2>&1 | tee "$OUT/setup.log"
python3 -m fastcomer env --json > "$OUT/env.json"

# The suite with CUDA present: the GPU tests run instead of skipping.
step python3 -m pytest tests --ignore=tests/interpreter -q -rs 2>&1 | tee "$OUT/tests.log"

if [ "$quick" = quick ]; then
  step python3 benchmarks/bench_decode_step.py --images 1,8 --lengths 256 --out "$OUT/decode_step.json"
  step python3 -m fastcomer bench --device cuda --quick --out "$OUT/engine.json"
else
  step python3 benchmarks/bench_decode_step.py --out "$OUT/decode_step.json" 2>&1 | tee "$OUT/decode_step.log"
  step python3 benchmarks/bench_arm_attention.py --out "$OUT/arm_attention.json" 2>&1 | tee "$OUT/arm_attention.log"
  step python3 benchmarks/bench_arm_attention.py --train --out "$OUT/arm_attention_train.json" 2>&1 | tee -a "$OUT/arm_attention.log"
  step python3 -m fastcomer bench --device cuda --shape 128x512 --shape 256x1024 --out "$OUT/engine_1image.json" 2>&1 | tee "$OUT/engine.log"
  step python3 -m fastcomer bench --device cuda --shape 128x512 --images 16 --batch 16 --out "$OUT/engine_16images.json" 2>&1 | tee -a "$OUT/engine.log"
fi
exit $status
