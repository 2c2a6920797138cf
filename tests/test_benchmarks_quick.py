"""Smoke runs of the op benchmarks at their --quick sizes: each asserts its providers agree
(loss and gradients, or sampled tokens inside the reference filter's support) before timing,
so a run that exits 0 is also a correctness check of the fast paths against the baselines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, name, providers",
    [
        ("bench_fused_linear.py", "fused_linear_quick",
         {"authors_eager", "authors_compile", "matmul_only", "qadapter_kernels"}),
        ("bench_sampling.py", "sampling_quick",
         {"hf", "torch_sort", "qadapter_kernels", "hf_from_hidden", "from_hidden", "from_hidden_two_stream",
          "head_product"}),
        ("bench_cached_step.py", "cached_step_quick", {"cached", "uncached"}),
    ],
)
def test_benchmark_quick(tmp_path, script, name, providers):
    cmd = [sys.executable, str(BENCH / script), "--quick", "--reps", "2", "--no-plot", "--device", "cpu",
           "--out", str(tmp_path)]
    # The checkout under test, not whichever copy of the package is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.json", f"{name}.md"}
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    assert {r["provider"] for r in payload["results"]} == providers
    assert all(r["ms"] > 0 for r in payload["results"])
