#!/usr/bin/env bash
# Every GPU check of the project in one unattended call (a lent GPU machine has minutes, not hours):
#   1. the tests marked `gpu` (pytest -m gpu), 2. benchmarks/bench_gpu.py, whose table is appended to
#   benchmarks/RESULTS.md (and copied to $OUT when the runner sets it, so it comes back from the machine).
# Usage, from the repository root:
#   bash benchmarks/gpu_all.sh                          # B/16 and XL/16 at 256 px, about 6 min on an H100
#   OFFICIAL_SRC=/path/to/PixelGen bash benchmarks/gpu_all.sh   # plus the official code's step and samplers
#   SIZES="B/16" BENCH_ARGS="--steps 10" bash benchmarks/gpu_all.sh
# PYTHON defaults to the project's venv when there is one, else `python`.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-}
log() { echo "[gpu_all $(date -u +%H:%M:%S)] $*" >&2; }

nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

log "pytest -m gpu"
timeout 120 "$PYTHON" -m pytest -q -m gpu tests/ 2>&1 | tail -20
tests_rc=${PIPESTATUS[0]}

log "bench_gpu.py"
official=()
[ -n "${OFFICIAL_SRC:-}" ] && official=(--official-src "$OFFICIAL_SRC")
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
timeout 420 "$PYTHON" benchmarks/bench_gpu.py --sizes ${SIZES:-B/16 XL/16} "${official[@]}" ${BENCH_ARGS:-} \
    | tee "${OUT:+$OUT/}bench_gpu_table.md"
bench_rc=${PIPESTATUS[0]}
[ -n "$OUT" ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
log "pytest -m gpu exit $tests_rc, bench_gpu.py exit $bench_rc"
{ [ "$tests_rc" -eq 0 ] || [ "$tests_rc" -eq 5 ]; } && [ "$bench_rc" -eq 0 ]  # pytest 5: no gpu test selected
