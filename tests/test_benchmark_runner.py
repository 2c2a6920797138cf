"""Self-check of the benchmark runner's CPU peak-memory measurement on known allocation patterns."""
import importlib.util
import sys
import time
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


def test_tables_are_kept_where_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    """A venv without matplotlib (vLLM's) still gets the JSON and markdown, and is told why no plot came."""
    real_find_spec = runner.importlib.util.find_spec
    monkeypatch.setattr(runner.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    r = runner.BenchResult("p", {"shape": "1x10"}, "float32", "cpu")
    r.set_timing(runner.measure_time(lambda: None, warmup=0, reps=1))
    runner.save_results([r], "check", tmp_path, runner.machine_info("cpu"))
    assert {p.name for p in tmp_path.iterdir()} == {"check.json", "check.md"}
    assert "check.png not drawn: matplotlib is not installed" in capsys.readouterr().out


def test_interleaved_timing_takes_turns():
    """Each round times every call once, in order, after the warm-up rounds; a slower call gets a larger median."""
    order = []
    calls = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.01))}
    timings = runner.measure_interleaved(calls, warmup=1, reps=3)
    assert order == ["fast", "slow"] * 4
    assert set(timings) == {"fast", "slow"}
    assert all(0 <= t.min_ms <= t.median_ms <= t.max_ms for t in timings.values())
    assert timings["slow"].median_ms >= 10 > timings["fast"].median_ms


def _load_targets():
    spec = importlib.util.spec_from_file_location("targets", Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("runner", runner)  # targets.py imports the runner by its script name
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_target_verdicts_one_format():
    targets = _load_targets()
    stated = runner.BenchResult("fused", {"shape": "2x512"}, "float32", "cpu", extra={"x compile": 0.5})
    other = runner.BenchResult("fused", {"shape": "2x64"}, "float32", "cpu", extra={"x compile": 2.0})
    slow = runner.BenchResult("fused", {"shape": "2x512"}, "bfloat16", "cpu", extra={"x compile": 0.9})
    rows = [
        targets.Target("fused", "x compile", "<=", 0.8, "cpu", targets.where("float32", shape="2x512")),
        targets.Target("fused", "x compile", "<=", 0.8, "cpu", targets.where("bfloat16")),
        targets.Target("fused", "x compile", ">=", 1.0, "cuda"),  # other device: not reported
        targets.Target("other", "x compile", "<=", 1.0, "cpu"),  # provider not run
    ]
    lines = targets.verdict_lines(rows, [stated, other, slow], "cpu")
    assert [line.split()[0] for line in lines] == ["PASS", "INFO", "INFO", "INFO", "INFO", "FAIL", "SKIP"]
    assert lines[0] == "PASS target: fused x compile <= 0.8 at shape=2x512 float32 cpu (got 0.5)"
    assert lines[-2] == "FAIL target: fused x compile <= 0.8 at shape=2x512 bfloat16 cpu (got 0.9)"
