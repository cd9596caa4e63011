#!/usr/bin/env bash
# The test suite: the plain tests, then the Triton kernels through Triton's interpreter
# in a process of their own (TRITON_INTERPRET must be set before triton is imported).
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python3 -m pytest tests --ignore=tests/interpreter --durations=15 "$@" || status=$?
if [ -d tests/interpreter ]; then
  TRITON_INTERPRET=1 python3 -m pytest tests/interpreter --durations=15 "$@" || status=$((status ? status : $?))
fi
# pytest's exit code 5 (no tests collected) is a failure here too.
exit $status
