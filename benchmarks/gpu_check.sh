#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device tool: `bash benchmarks/gpu_check.sh`):
# build the extension against the torch installed there, run the whole test suite natively on
# CUDA (Triton kernels compiled, not interpreted), then the GPU benchmarks. Results go to $OUT
# (the device tool brings them back) or benchmarks/results/gpu-local/.
#
# The device tool brings back at most 8 files, so $OUT gets two:
#   gpu_check.log     device, pytest output, every benchmark's stdout (tables and PASS/FAIL lines)
#   results.tgz       every benchmark's {json,md,png}, under results/ (tar xzf results.tgz)
# (plus build.log, only when the build fails, which stops the run there).
#
# One device call may run 600 s: `gpu_check.sh tests` and `gpu_check.sh bench` split the work
# into two calls (both build first; the build is cached on a warm machine). Default: all.
set -uo pipefail
stage="${1:-all}"
case "$stage" in all|tests|bench) ;; *) echo "usage: $0 [all|tests|bench]" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-local}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1
status=0
section() { printf '\n===== %s =====\n' "$1" | tee -a "$LOG"; }
: > "$LOG"
section device
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$LOG"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
build_log="$(mktemp)"
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . > "$build_log" 2>&1; then
  cp "$build_log" "$OUT/build.log"; tail -40 "$build_log" | tee -a "$LOG"; exit 1
fi
if [ "$stage" != bench ]; then
  section pytest
  python3 -m pytest -q -rfE tests >> "$LOG" 2>&1 || status=1
  # Everything since the pytest header, to stdout: its summary is at the end.
  sed -n '/===== pytest =====/,$p' "$LOG" | tail -30
fi
[ "$stage" = tests ] && exit $status
results="$(mktemp -d)/results"
for script in benchmarks/bench_*.py; do  # the same list as run_all.sh
  section "$(basename "$script" .py)"
  # The forgetting benchmark trains ~15 models (about an hour): only its quick pass fits one device call.
  size=(); [ "$(basename "$script")" = bench_forgetting.py ] && size=(--quick)
  python3 "$script" "${size[@]}" --out "$results" 2>&1 | grep --line-buffered -v '^USDT:' | tee -a "$LOG" || status=1
done
tar czf "$OUT/results.tgz" -C "$(dirname "$results")" results
exit $status
