"""Smoke runs of the op benchmarks at their --quick sizes: each asserts its providers agree
(loss and gradients, or sampled tokens inside the reference filter's support) before timing,
so a run that exits 0 is also a correctness check of the fast paths against the baselines."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(tmp_path, script: str, name: str) -> dict:
    """Runs ``script --quick`` into ``tmp_path``; its ``<name>.json`` payload."""
    cmd = [sys.executable, str(BENCH / script), "--quick", "--reps", "2", "--no-plot", "--device", "cpu",
           "--out", str(tmp_path)]
    # The checkout under test, not whichever copy of the package is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH.parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.json", f"{name}.md"}
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "script, name, providers",
    [
        ("bench_fused_linear.py", "fused_linear_quick",
         {"authors_eager", "authors_compile", "matmul_only", "qadapter_kernels"}),
        ("bench_sampling.py", "sampling_quick",
         {"hf", "torch_sort", "qadapter_kernels", "hf_from_hidden", "from_hidden", "from_hidden_two_stream",
          "head_product", "head_product_rows", "read_floor", "copy", "mass_floor"}),
        ("bench_cached_step.py", "cached_step_quick", {"cached", "uncached"}),
    ],
)
def test_benchmark_quick(tmp_path, script, name, providers):
    payload = run_quick(tmp_path, script, name)
    assert {r["provider"] for r in payload["results"]} == providers
    assert all(r["ms"] > 0 for r in payload["results"])


def test_generation_quick_against_hf_base_by_phase(tmp_path):
    """Every decoder gets its prefill and decode times and its ratios to transformers' generate of the base
    model, and the run checked that generate's greedy tokens against the package's base-only decoding."""
    payload = run_quick(tmp_path, "bench_generation.py", "generation_quick")
    results = payload["results"]
    assert {r["provider"] for r in results} == {"mixed_batch", "two_pass", "authors", "base_alone", "hf_base",
                                                "hf_base_2B", "base_alone_2B"}
    for r in results:
        for column in ("tok/s", "prefill ms", "ms/token", "x hf_base tok/s", "prefill x hf_base", "decode x hf_base"):
            assert math.isfinite(r["extra"][column]), (r["provider"], column, r["extra"])
        assert r["extra"]["prefill ms"] > 0
    assert all(r["extra"]["x hf_base tok/s"] == 1.0 for r in results if r["provider"] == "hf_base")
    for r in results:  # mixed_batch against its floors, the base model on its 2B rows two ways, in each phase
        if r["provider"] == "mixed_batch":
            columns = [f"x {f} tok/s" for f in ("floor", "own floor")] + [
                f"{phase} x {f}" for phase in ("prefill", "decode") for f in ("floor", "own floor")]
            assert all(math.isfinite(r["extra"][c]) for c in columns), r["extra"]
    assert sum("same 8 tokens with base_alone, hf_base" in note for note in payload["notes"]) == 2  # B = 1 and 2
