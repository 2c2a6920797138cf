"""Every Triton kernel compiles for sm_90 (PTX assembled by the ptxas that ships with triton).

The interpreter, which the CPU tests use, never runs Triton's compiler; this catches what only
the compiler sees, without a GPU. On a CUDA machine the kernels are compiled for real by the
other tests, so this runs on CPU machines only.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines compile the kernels in the other tests")
def test_every_triton_kernel_compiles_for_hopper():
    script = Path(__file__).with_name("triton_compile_check.py")
    # The checkout under test, not whichever copy of the package is installed.
    repo = str(script.parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok  ") >= 40, proc.stdout
