"""The profiling CI's gate: fails when a time ratio of the quick benchmark pass regresses.

Ratios, not times: each is measured against a baseline provider in the same run with the same
threads, so a slower or busier machine moves both sides. The quick shapes are small and the CI
machine is shared, so a ratio FAILS only when it is worse than its recorded value by more than
``NOISE_MARGIN`` (the one place the margin is set; see its comment for how it was chosen).

    python benchmarks/regression_gate.py DIR              # check DIR's *_quick.json against the baseline
    python benchmarks/regression_gate.py DIR1 DIR2 DIR3 --update   # record the median of several passes

The baseline is benchmarks/quick_baseline.json: {"<result name>|<provider>|<metric>|<config>": value}.
A gated ratio missing from the run also FAILS (a provider that stops running cannot pass silently).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

BASELINE = Path(__file__).with_name("quick_baseline.json")

# Worse by more than this factor fails: a "<=" ratio above baseline x margin, a ">=" ratio below
# baseline / margin. Chosen from five quick passes (OMP_NUM_THREADS=1, 2026-12-01 08:39-08:51 UTC,
# on the 2-core development machine at load 4.5-6.5 from other jobs, the CI box's kind): the
# baseline is their median, and the furthest any gated ratio fell from its median in the worse
# direction was 1.98x (qadapter_loss x traffic floor, 15.1 against 7.63; next: the sampler x hf at
# B=16 1.71x, fused_linear x eager 1.65x, the rest <= 1.5x). 3.0 leaves 1.5x headroom over that and
# still catches a kernel that loses its fused path (x hf, x traffic floor and x head_product then
# move 5x to 100x at these shapes). It does NOT catch a slowdown smaller than 3x: run the full
# benchmarks for that. Ratios too unstable to gate are left out of GATED (see there).
NOISE_MARGIN = 3.0

# The quick pass and the baseline run with this many threads (.ci/run sets OMP_NUM_THREADS to it).
# One thread: the CI box has 2 cores shared with other jobs, and a ratio against multi-threaded eager
# PyTorch then depends on whether the second core happens to be free (two such ratios moved 4-6x
# between a loaded 1-thread and a quiet 2-thread run); one thread per side is what both sides get
# on a busy or a quiet box alike. A run with other threads FAILS: its ratios are not comparable.
THREADS = 1

# (result name, provider, metric, direction): the ratios the quick pass measures against a baseline.
GATED = [
    # The sampler's baselines: the median of six 1-thread quick passes (2026-12-07) since bench_sampling
    # times its providers in turns; from_hidden at B=1 (a few us against a tiny head product) moved
    # 3.9 to 10.7 over them, the other three at most 1.3x from their median.
    ("sampling_quick", "qadapter_kernels", "x hf", "<="),
    ("sampling_quick", "from_hidden", "x head_product", "<="),
    # Not "x eager": eager's ~5 ms of small-op temporaries at 2x64x4096 swung 6.3x (0.0485 to 0.303)
    # over the five passes the margin was chosen from; the traffic floor of the same run is steadier.
    ("qadapter_loss_quick", "qadapter_kernels", "x traffic floor", "<="),
    ("fused_linear_quick", "qadapter_kernels", "x eager", "<="),
    ("generation_quick", "mixed_batch", "x two_pass tok/s", ">="),
    ("generation_quick", "mixed_batch", "x base_alone tok/s", ">="),
    ("generation_quick", "mixed_batch", "x hf_base tok/s", ">="),
    ("training_step_quick", "qadapter_kernels", "x authors step", "<="),
    # The vLLM plug-in against plain vLLM answering the 2N rows it runs (bench_serving, in the vLLM venv):
    # over three 1-thread quick passes it moved between 0.64 and 0.84, so only a lost one-pass design or
    # a broken stream shows at this margin.
    ("serving_quick", "qadapter_vllm", "x floor tok/s", ">="),
    ("cached_step_quick", "cached", "x uncached step", "<="),
    # CPU time, not wall time: each row runs in its own process, so a busy box can take slices from one
    # row and not another (wall/CPU reached 2x on the development machine while another job shared the core).
    ("vs_trl_quick", "qadapter", "x trl dpo cpu", "<="),
    ("vs_trl_quick", "qadapter cached base", "x trl dpo cpu", "<="),
]


def config_text(result: dict) -> str:
    config = " ".join(f"{k}={v}" for k, v in result["config"].items())
    return f"{config} {result['dtype']} {result['device']}"


def measured(out_dir: Path) -> dict[str, tuple[float, str]]:
    """key -> (value, direction) of every gated ratio in one run's *_quick.json files; a file run
    with other than THREADS threads contributes nothing (so its ratios fail as not measured)."""
    ratios = {}
    for name, provider, metric, direction in GATED:
        path = out_dir / f"{name}.json"
        if not path.exists():
            continue
        run = json.loads(path.read_text())
        threads = run.get("machine", {}).get("cpu_threads")
        if threads != THREADS:
            print(f"regression gate: {path} ran with {threads} threads, the gate with {THREADS} "
                  f"(OMP_NUM_THREADS={THREADS}); its ratios are not compared")
            continue
        for result in run["results"]:
            if result["provider"] == provider and metric in result["extra"]:
                ratios[f"{name}|{provider}|{metric}|{config_text(result)}"] = (result["extra"][metric], direction)
    return ratios


def median_of(out_dirs: list[Path]) -> dict[str, tuple[float, str]]:
    """key -> (median over the runs that measured it, direction)."""
    runs = [measured(d) for d in out_dirs]
    keys = sorted(set().union(*runs))
    median = {}
    for key in keys:
        values = sorted(run[key][0] for run in runs if key in run)
        median[key] = (values[len(values) // 2], next(run[key][1] for run in runs if key in run))
    return median


def verdict(key: str, baseline: float, direction: str, run: dict) -> tuple[bool, str]:
    if key not in run:
        return False, f"FAIL gate: {key} not measured (baseline {baseline:.3g})"
    value = run[key][0]
    limit = baseline * NOISE_MARGIN if direction == "<=" else baseline / NOISE_MARGIN
    ok = value <= limit if direction == "<=" else value >= limit
    return ok, f"{'PASS' if ok else 'FAIL'} gate: {key} {direction} {limit:.3g} (got {value:.3g}, baseline {baseline:.3g})"


def write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dirs", type=Path, nargs="+",
                        help="--out folder(s) of `benchmarks/run_all.sh --quick` (several: their median)")
    parser.add_argument("--update", action="store_true", help="record these runs' ratios as the baseline")
    args = parser.parse_args()
    run = median_of(args.out_dirs)
    if args.update:
        write_atomically(BASELINE, json.dumps({k: v for k, (v, _) in sorted(run.items())}, indent=2) + "\n")
        print(f"wrote {len(run)} ratios to {BASELINE}")
        return 0
    directions = {(n, p, m): d for n, p, m, d in GATED}
    results = []
    for key, value in json.loads(BASELINE.read_text()).items():
        name, provider, metric, _ = key.split("|", 3)
        results.append(verdict(key, value, directions[(name, provider, metric)], run))
    for _, line in results:
        print(line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
