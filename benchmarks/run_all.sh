#!/usr/bin/env bash
# Runs every benchmark script (benchmarks/bench_*.py: adding a script adds it here and to
# gpu_check.sh) with the same arguments (e.g. --quick --out DIR), printing each table; fails if
# any script fails.
set -euo pipefail
cd "$(dirname "$0")/.."
for script in benchmarks/bench_*.py; do
  echo "== $(basename "$script" .py) =="
  python3 "$script" "$@"
done
