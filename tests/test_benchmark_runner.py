"""Self-check of the benchmark runner's CPU peak-memory measurement on known allocation patterns."""
import importlib.util
import sys
from pathlib import Path

import torch

# benchmarks/ is a folder of scripts, not an installed package: load the runner by path.
_spec = importlib.util.spec_from_file_location(
    "bench_runner", Path(__file__).resolve().parents[1] / "benchmarks" / "runner.py"
)
runner = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = runner  # dataclasses look their module up there
_spec.loader.exec_module(runner)

MB4 = 1000 * 1000 * 4  # one torch.empty(1000, 1000) fp32 buffer


def test_peak_counts_live_buffers():
    assert runner.measure_peak_memory(lambda: (torch.empty(1000, 1000), torch.empty(1000, 1000))) == 2 * MB4


def test_peak_sees_free_before_second_alloc():
    def alloc_free_alloc():
        a = torch.empty(1000, 1000)
        del a
        return torch.empty(1000, 1000)

    assert runner.measure_peak_memory(alloc_free_alloc) == MB4


def test_peak_sees_short_lived_temporary():
    # (x * 2) lives only inside the expression; the net change is a few bytes, the peak is not.
    x = torch.randn(1000, 1000)
    peak = runner.measure_peak_memory(lambda: (x * 2).sum())
    assert MB4 <= peak < MB4 + 1024


def test_peak_excludes_inputs_and_counts_backward():
    x = torch.randn(1000, 1000, requires_grad=True)

    def fwd_bwd():
        x.grad = None
        (x * x).sum().backward()

    # x * x (forward) and the grad buffers of the backward, at most three 4 MB buffers at once;
    # x itself was allocated before and does not count.
    peak = runner.measure_peak_memory(fwd_bwd)
    assert 2 * MB4 <= peak <= 3 * MB4 + 1024
    assert x.grad is not None


def test_timing_and_writers(tmp_path):
    t = runner.measure_time(lambda: torch.ones(10).sum(), warmup=1, reps=3)
    assert 0 <= t.min_ms <= t.median_ms <= t.max_ms
    r = runner.BenchResult("p", {"shape": "1x10"}, "float32", "cpu", peak_bytes=MB4, extra={"x eager": 0.5})
    r.set_timing(t)
    md = runner.save_results([r], "check", tmp_path, runner.machine_info("cpu"), notes=["PASS: x"])
    assert "| p | 1x10 | float32 |" in md and "PASS: x" in md
    assert {p.name for p in tmp_path.iterdir()} == {"check.json", "check.md", "check.png"}
