#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (device tool: `bash benchmarks/gpu_check.sh`):
# build the extension against the torch installed there, run the whole test suite natively on
# CUDA (Triton kernels compiled, not interpreted), then the GPU benchmarks. Results go to $OUT
# (the device tool brings them back) or benchmarks/results/gpu-local/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-local}"
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if ! python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; exit 1
fi
python3 -m pytest -q -rfE tests > "$OUT/pytest.txt" 2>&1 || status=1
tail -30 "$OUT/pytest.txt"
python3 benchmarks/bench_qadapter_loss.py --out "$OUT" 2>&1 | tee "$OUT/bench_qadapter_loss.txt" || status=1
exit $status
