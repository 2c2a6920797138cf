#!/usr/bin/env bash
# Runs every benchmark script with the same arguments (e.g. --quick --out DIR), printing each
# table; fails if any script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in bench_qadapter_loss bench_fused_linear bench_sampling bench_training_step bench_generation; do
  echo "== ${script} =="
  python3 "benchmarks/${script}.py" "$@"
done
