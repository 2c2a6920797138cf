#!/usr/bin/env bash
# The package as users get it, on CPUs older than this one: build a wheel, install it into a fresh
# venv, and run the ops smoke test (tests/cpu_kernels_smoke.py) there natively, then under qemu-user
# as an x86-64 without AVX-512 (Haswell: AVX2) and one without AVX (Nehalem: SSE4.2). A positive
# control first shows that the emulator does refuse AVX-512 (the AVX512 kernels die with SIGILL).
# Needs Debian's qemu-user; about 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
PY="${PYTHON:-python3}"
work="$(mktemp -d)"
"$PY" -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$work/dist" .
"$PY" -m venv "$work/venv"
# PIP_CONSTRAINT (set by .ci/run) holds torch to the local 2.13.0 wheel.
"$work/venv/bin/pip" install -q --disable-pip-version-check "$work"/dist/qadapter_kernels-*.whl
venv_python="$work/venv/bin/python"
smoke="$repo/tests/cpu_kernels_smoke.py"
cd "$work"  # not the checkout: the package must come from the venv

echo "== wheel smoke test, native =="
"$venv_python" "$smoke" --expect-package-under "$work/venv"

quiet() { grep -v "TCG doesn't support requested feature" || true; }

echo "== positive control: the AVX512 kernels under an emulated Haswell die with SIGILL =="
set +e
qemu-x86_64 -cpu Haswell "$venv_python" - <<'PY' 2>&1 | quiet
import importlib.util, pathlib, site, torch
folder = pathlib.Path(site.getsitepackages()[0]) / "qadapter_kernels" / "ops"
path = next(folder.glob("_C_AVX512*.so"))
spec = importlib.util.spec_from_file_location("_C_AVX512", path)  # bypasses the run-time choice
spec.loader.exec_module(importlib.util.module_from_spec(spec))
q = torch.randn(4, 4096)
torch.ops.qadapter.residual_q_values(q, q, torch.zeros(4, dtype=torch.long), 1.0, 0.01)
print("the AVX512 kernels ran: this emulator does not refuse AVX-512")
PY
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 132 ]; then
  echo "positive control failed: expected SIGILL (exit 132), got exit $status"; exit 1
fi
echo "SIGILL, as expected"

for cpu in Haswell Nehalem; do
  expect=$([ "$cpu" = Haswell ] && echo AVX2 || echo DEFAULT)
  echo "== wheel smoke test, emulated $cpu (expects the $expect kernels) =="
  qemu-x86_64 -cpu "$cpu" "$venv_python" "$smoke" --expect "$expect" --expect-package-under "$work/venv" 2>&1 | quiet
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "smoke test failed on emulated $cpu"; exit 1; }
done
rm -rf "$work"
