"""Shared benchmark runner: timing, peak memory, result records and writers.

Every op benchmark builds a list of :class:`BenchResult` (one per provider and config) with
:func:`measure_time` and :func:`measure_peak_memory`, then calls :func:`save_results`, which
writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``benchmarks/results/<device-tag>/``
and prints the markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
_MEMORY_EVENT = "[memory]"  # the profiler's name for one allocation (+bytes) or free (-bytes)


# --------------------------------------------------------------------------- measurements


@dataclass
class Timing:
    """Wall time of one call in milliseconds: median, fastest and slowest of the timed reps."""

    median_ms: float
    min_ms: float
    max_ms: float


def measure_time(
    fn: Callable[[], Any],
    warmup: int = 3,
    reps: int = 10,
    device: torch.device | str = "cpu",
    grad_to_none: Sequence[torch.Tensor] | None = None,
    whole_calls: bool = False,
) -> Timing:
    """Time ``fn()`` after warm-up.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls); there
    ``warmup`` and ``reps`` are time budgets in ms, as do_bench takes them (the call count
    follows from a runtime estimate). CPU, or CUDA with ``whole_calls`` (for calls of seconds
    that sync the host themselves, such as generation): ``warmup`` untimed calls, then ``reps``
    calls each timed on its own (``time.perf_counter``; CUDA events on a GPU).
    ``grad_to_none`` tensors get ``.grad = None`` before every call, outside the timed region.
    """
    cuda = torch.device(device).type == "cuda"
    if cuda and not whole_calls:
        import triton.testing

        times = triton.testing.do_bench(
            fn, warmup=warmup, rep=reps, grad_to_none=grad_to_none, return_mode="all"
        )
    else:
        times = []
        for _ in range(warmup):
            _reset_grads(grad_to_none)
            fn()
        # A collection inside the timed loop would land on one rep at random.
        gc.collect()
        gc.disable()
        try:
            for _ in range(reps):
                _reset_grads(grad_to_none)
                times.append(_time_one_call(fn, cuda))
        finally:
            gc.enable()
    return Timing(statistics.median(times), min(times), max(times))


def _time_one_call(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1e3


def measure_interleaved(
    calls: dict[Any, Callable[[], Any]], warmup: int = 1, reps: int = 3, device: torch.device | str = "cpu",
    settle: int = 0,
) -> dict[Any, Timing]:
    """Time several calls in turns: ``warmup`` untimed rounds, then ``reps`` rounds each timing every
    call once (CUDA events on a GPU). Unlike ``measure_time`` run per call, a change of the machine's
    load midway (another job on the core) falls on every call alike, so their ratios hold on a shared
    machine. ``settle`` untimed calls of the same function right before each timed one leave the caches
    as that call leaves them (its inputs hot), not as the previous call in the round left them.
    Returns key -> :class:`Timing`."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[Any, list[float]] = {key: [] for key in calls}
    gc.collect()
    gc.disable()  # a collection inside the timed rounds would land on one call at random
    try:
        for _ in range(reps):
            for key, fn in calls.items():
                for _ in range(settle):
                    fn()
                times[key].append(_time_one_call(fn, cuda))
    finally:
        gc.enable()
    return {key: Timing(statistics.median(t), min(t), max(t)) for key, t in times.items()}


def _reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, beyond what was allocated before it.

    What ``fn`` returns is dropped only after the measurement, so it counts. CUDA: the
    caching allocator's peak minus the baseline. CPU has no allocator statistics, so the
    profiler's allocation records (every CPU ``at::empty``/free, C++ custom ops and the
    autograd backward included) are replayed in time order and the running sum's maximum
    taken; frees of tensors allocated before ``fn`` may take the sum below zero, and the
    peak is never below 0. Allocations on other threads (Python threads, OpenMP workers)
    are not recorded: ATen ops allocate their outputs on the calling thread.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        del out
        return max(peak, 0)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    # The raw records, not prof.events(): a FunctionEvent's cpu_memory_usage is the net
    # bytes of every record inside its time range, so nested ops count the same allocation
    # twice and an op that allocates and frees a temporary nets to zero.
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == _MEMORY_EVENT and e.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def achieved_gbps(bytes_moved: float, ms: float) -> float:
    """Bandwidth in GB/s (1e9 bytes) of moving ``bytes_moved`` bytes in ``ms`` milliseconds."""
    return bytes_moved / (ms * 1e-3) / 1e9


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 2**30, fresh_output: bool = False) -> float:
    """Measured device-memory copy bandwidth (read + write) in GB/s: the roofline for ops that
    stream their inputs once. Times ``y.copy_(x)`` of ``nbytes`` with :func:`measure_time`.

    ``fresh_output``: copy into a newly allocated ``y`` each call (``torch.empty_like(x).copy_(x)``),
    what an op that returns a fresh tensor pays with the default allocator; on CPU that includes
    the page faults of first touching freshly mapped memory."""
    # Both written before timing: a never-touched CPU tensor is backed by the kernel's shared zero
    # page, whose reads hit cache and would inflate the bandwidth (an earlier version of this
    # function did that: 25-31 GB/s instead of ~19 on the 2-core development VM).
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    copy = (lambda: torch.empty_like(x).copy_(x)) if fresh_output else (lambda: y.copy_(x))
    # CUDA: do_bench budgets in ms; CPU: call counts (a 1 GiB copy takes ~0.1 s there).
    warmup, reps = (25, 200) if torch.device(device).type == "cuda" else (2, 10)
    timing = measure_time(copy, warmup=warmup, reps=reps, device=device)
    return achieved_gbps(2 * nbytes, timing.median_ms)


# --------------------------------------------------------------------------- records and machine info


@dataclass
class BenchResult:
    """One provider on one config. ``extra`` holds derived columns (ratios, GB/s), which are
    filled in once all providers of a config have run."""

    provider: str
    config: dict[str, Any]
    dtype: str
    device: str
    ms: float | None = None
    ms_min: float | None = None
    ms_max: float | None = None
    peak_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def set_timing(self, timing: Timing) -> None:
        """Copy a :class:`Timing` into the ms columns."""
        self.ms, self.ms_min, self.ms_max = timing.median_ms, timing.min_ms, timing.max_ms


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device: the GPU's name, or the CPU model."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device | str) -> str:
    """Folder name for a device's results: ``cpu``, or the CUDA device name slugified
    (e.g. ``nvidia-h100-80gb-hbm3``)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def default_out_dir(device: torch.device | str) -> Path:
    """``benchmarks/results/<device-tag>/``."""
    return RESULTS_DIR / device_tag(device)


def machine_info(device: torch.device | str) -> dict[str, Any]:
    """What a result depends on besides the code: device, library versions, threads, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # OpenMP settings (threads, wait policy) move CPU numbers a lot on small machines.
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
        # Other work on a small machine skews CPU timings: take this before the run to spot it.
        "load_avg_1min": os.getloadavg()[0],
    }
    if torch.device(device).type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- writers


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(results: Sequence[BenchResult], title: str, info: dict[str, Any]) -> str:
    """The results as a markdown table under a header naming the machine."""
    config_keys = list(dict.fromkeys(k for r in results for k in r.config))
    extra_keys = list(dict.fromkeys(k for r in results for k in r.extra))
    header = ["provider", *config_keys, "dtype", "ms (median)", "ms min", "ms max", "peak MiB", *extra_keys]
    lines = [
        f"## {title}",
        "",
        f"{info['device_name']} ({info['device']}), torch {info['torch']}, triton {info['triton']}, "
        f"{info['cpu_threads']} CPU threads, load {info['load_avg_1min']:.2f}, {info['date']}"
        + "".join(f", {k}={v}" for k, v in info.get("env", {}).items()),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in results:
        peak = None if r.peak_bytes is None else r.peak_bytes / 2**20
        row = [r.provider, *(r.config.get(k) for k in config_keys), r.dtype, r.ms, r.ms_min, r.ms_max, peak]
        row += [r.extra.get(k) for k in extra_keys]
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot_results(
    results: Sequence[BenchResult], path: Path, title: str, time_label: str = "fwd+bwd time (ms)"
) -> None:
    """Grouped bars, one group per config (+dtype), one bar per provider: time and peak memory
    (the memory panel is left out when no result has a peak)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    def label(r: BenchResult) -> str:
        return " ".join(str(v) for v in r.config.values()) + f" {r.dtype}"

    groups = list(dict.fromkeys(label(r) for r in results))
    providers = list(dict.fromkeys(r.provider for r in results))
    by_key = {(label(r), r.provider): r for r in results}
    panels = [(time_label, lambda r: r.ms)]
    if any(r.peak_bytes is not None for r in results):
        panels.append(
            ("peak memory beyond inputs (MiB)", lambda r: None if r.peak_bytes is None else r.peak_bytes / 2**20)
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 3 * len(groups)), 4.5), squeeze=False)
    axes = axes[0]
    width = 0.8 / len(providers)
    for ax, (ylabel, get) in zip(axes, panels):
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for g, group in enumerate(groups):
                r = by_key.get((group, provider))
                if r is not None and get(r) is not None:
                    xs.append(g + (i - (len(providers) - 1) / 2) * width)
                    ys.append(get(r))
            ax.bar(xs, ys, width, label=provider)
        ax.set_xticks(range(len(groups)), groups, rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")  # shapes span orders of magnitude
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shapes_argument(dims: str):
    """An argparse type for comma-separated shapes such as ``2x512x32000`` whose dimensions are
    named by ``dims`` (e.g. ``"2BxTxV"``); it returns a list of int tuples."""
    count = len(dims.split("x"))

    def parse(text: str) -> list[tuple[int, ...]]:
        try:
            shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",") if s]
        except ValueError:
            shapes = [()]
        if not shapes or any(len(s) != count for s in shapes):
            raise argparse.ArgumentTypeError(f"shapes are {dims}, got {text!r}")
        return shapes

    return parse


def add_common_arguments(parser, quick_help: str, reps_help: str) -> None:
    """The flags every benchmark script takes: --quick, --device, --reps, --out, --no-plot."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, help=reps_help)
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device-tag>/)")
    parser.add_argument("--no-plot", action="store_true", help="write only the JSON and markdown, no PNG")


def save_results(
    results: Sequence[BenchResult],
    name: str,
    out_dir: Path | str,
    info: dict[str, Any],
    title: str | None = None,
    notes: Sequence[str] = (),
    plot: bool = True,
    time_label: str = "fwd+bwd time (ms)",
) -> str:
    """Write ``<name>.json``, ``<name>.md`` (table, then ``notes`` such as PASS/FAIL lines)
    and, unless ``plot`` is False, ``<name>.png`` (time axis labelled ``time_label``) into
    ``out_dir``; print the markdown and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title or name
    md = markdown_table(results, title, info)
    if notes:
        md += "\n" + "\n".join(notes) + "\n"
    payload = {"name": name, "machine": info, "notes": list(notes), "results": [asdict(r) for r in results]}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(md)
    if plot and importlib.util.find_spec("matplotlib") is None:
        # The tables above are the result; a venv without matplotlib (vLLM's) must not lose them to the plot.
        print(f"{name}.png not drawn: matplotlib is not installed here (pip install matplotlib)")
        plot = False
    if plot:
        plot_results(results, out_dir / f"{name}.png", title, time_label)
    print(md)
    print(f"wrote {out_dir / name}.{{json,md{',png' if plot else ''}}}")
    return md
