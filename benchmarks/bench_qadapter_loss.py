"""Q-Adapter loss from [2B, T, V] logits: fwd+bwd time and peak memory, three providers.

- ``authors_eager``:    ``reference.authors_qadapter_loss`` (the authors' formula) in eager PyTorch
- ``authors_compile``:  the same under ``torch.compile``
- ``qadapter_kernels``: ``qadapter_kernels.qadapter_loss(..., variant="official", length_norm="padded")``
                        (C++ on CPU, Triton on CUDA)

All three compute the same loss (the "official" variant, scores over T - 1); that is asserted before timing.
Memory-traffic floor: the bytes fwd+bwd must move (forward reads Q and L; backward reads
Q and L and writes dQ: 5x the bytes of Q) divided by the copy bandwidth of a same-size tensor copy
(``y.copy_(x)``, x as large as Q, into an already-written y) measured in the same run with the same
threads. ``x traffic floor`` is a provider's fwd+bwd time over that floor; ``GB/s`` its achieved
bandwidth on those bytes. The loss must return a fresh dQ, so the same copy into a freshly allocated
y (``fresh copy GB/s``: the default allocator's page faults included) is reported next to it with
``x fresh-copy floor``; the stated target uses the stricter, warm one. The fused op's forward and
backward are also timed alone (``fwd``/``bwd`` rows: GB/s on 2x and 3x the bytes of Q) against the
copy bandwidth (CUDA: of 1 GiB; CPU: of the same-size copy).
Run from the repo root::

    python benchmarks/bench_qadapter_loss.py [--quick] [--shapes 2x512x32000,...] [--dtypes float32,bfloat16]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

import qadapter_kernels as qk
from qadapter_kernels import reference
from targets import Target, verdict_lines, where
from runner import (
    DTYPES,
    BenchResult,
    add_common_arguments,
    achieved_gbps,
    copy_bandwidth_gbps,
    default_out_dir,
    machine_info,
    measure_peak_memory,
    measure_time,
    save_results,
    shapes_argument,
)

Shape = tuple[int, int, int]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

CPU_SHAPES: list[Shape] = [(2, 512, 32000), (2, 512, 128256)]
GPU_SHAPES: list[Shape] = [*CPU_SHAPES, (8, 1024, 128256)]
QUICK_SHAPES: list[Shape] = [(2, 64, 4096)]
FUSED = "qadapter_kernels"

TARGETS = [
    Target(FUSED, "x compile", "<=", 0.8, "cpu", where("float32", shape="2x512x32000")),
    Target(FUSED, "x eager", "<=", 0.25, "cpu", where("float32", shape="2x512x32000")),
    Target(FUSED, "peak/dQ", "<=", 1.25, "cpu", where("float32", shape="2x512x32000")),
    Target(FUSED, "x traffic floor", "<=", 1.3, "cpu", where("float32", shape="2x512x32000")),
    Target(f"{FUSED} fwd", "% copy BW", ">=", 80.0, "cuda", where("bfloat16", shape="8x1024x128256")),
    Target(f"{FUSED} bwd", "% copy BW", ">=", 80.0, "cuda", where("bfloat16", shape="8x1024x128256")),
]


def fused_loss(q, base, input_ids, loss_mask):
    """The fused op on the authors' variant, the fast path for the tensors' device."""
    return qk.qadapter_loss(q, base, input_ids, loss_mask, variant="official", length_norm="padded",
                            backend=None).loss


def providers() -> dict[str, LossFn]:
    """Name -> loss function. The compiled one is fresh: it compiles on its first call."""
    return {
        "authors_eager": reference.authors_qadapter_loss,
        # Static shapes: each config gets kernels specialised to it, the compile baseline's best case.
        "authors_compile": torch.compile(reference.authors_qadapter_loss, dynamic=False),
        FUSED: fused_loss,
    }


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random logits and a realistic batch: rows 0..B-1 chosen, B..2B-1 rejected; the first
    quarter of each row is prompt, the rest response; the last row is right-padded by T/8."""
    B2, T, V = shape
    torch.manual_seed(seed)
    q = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    base = torch.randn(shape, dtype=dtype, device=device)
    input_ids = torch.randint(0, V, (B2, T), device=device)
    loss_mask = torch.zeros(B2, T, dtype=torch.bool, device=device)
    loss_mask[:, T // 4 :] = True
    loss_mask[-1, T - T // 8 :] = False
    input_ids[-1, T - T // 8 :] = 0  # pad id
    return q, base, input_ids, loss_mask


def check_agreement(fns: dict[str, LossFn], inputs, dtype: torch.dtype) -> None:
    """Assert every provider's loss and dQ match the eager baseline's (also warms up compile)."""
    q = inputs[0]
    loss_rtol, grad_rtol = (1e-4, 1e-3) if dtype == torch.float32 else (1e-3, 1e-2)
    ref_loss = ref_grad = None
    for name, fn in fns.items():
        q.grad = None
        loss = fn(*inputs)
        loss.backward()
        loss, grad = loss.detach().double(), q.grad
        q.grad = None
        if ref_loss is None:
            ref_loss, ref_grad = loss, grad
            continue
        assert torch.allclose(loss, ref_loss, rtol=loss_rtol, atol=0), f"{name}: loss {loss.item()} != {ref_loss.item()}"
        # Row by row: full-size fp32 temporaries of an [8, 1024, 128256] dQ would cost GiBs each.
        err = max((g.float() - r.float()).abs().max().item() for g, r in zip(grad, ref_grad))
        scale = max(r.float().abs().max().item() for r in ref_grad)
        assert err <= grad_rtol * scale, f"{name}: dQ max error {err / scale:.2e} of max |dQ|"


def bench_config(shape: Shape, dtype_name: str, device: str, warmup: int, reps: int, copy_gbps: float | None) -> list[BenchResult]:
    """All providers on one shape and dtype; ratio columns filled in."""
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype, device)
    q = inputs[0]
    dq_bytes = q.numel() * q.element_size()
    config = {"shape": "x".join(map(str, shape))}
    torch._dynamo.reset()  # drop kernels compiled for earlier configs
    fns = providers()
    check_agreement(fns, inputs, dtype)

    results = []
    for name, fn in fns.items():

        def fwd_bwd(fn=fn):
            fn(*inputs).backward()

        r = BenchResult(name, config, dtype_name, device)
        # grad_to_none frees dQ between calls, outside the timed region.
        r.set_timing(measure_time(fwd_bwd, warmup, reps, device, grad_to_none=[q]))
        q.grad = None  # else the old dQ is freed inside the measurement
        r.peak_bytes = measure_peak_memory(fwd_bwd, device)
        q.grad = None
        results.append(r)
    eager_ms, compile_ms = results[0].ms, results[1].ms
    same_size_copy_gbps = copy_bandwidth_gbps(device, dq_bytes)
    fresh_copy_gbps = copy_bandwidth_gbps(device, dq_bytes, fresh_output=True)
    floor_ms = 5 * dq_bytes / (same_size_copy_gbps * 1e9) * 1e3
    fresh_floor_ms = 5 * dq_bytes / (fresh_copy_gbps * 1e9) * 1e3
    for r in results:
        r.extra["x eager"] = r.ms / eager_ms
        r.extra["x compile"] = r.ms / compile_ms
        r.extra["peak/dQ"] = r.peak_bytes / dq_bytes
        r.extra["GB/s"] = achieved_gbps(5 * dq_bytes, r.ms)
        r.extra["copy GB/s"] = same_size_copy_gbps
        r.extra["x traffic floor"] = r.ms / floor_ms
        r.extra["fresh copy GB/s"] = fresh_copy_gbps
        r.extra["x fresh-copy floor"] = r.ms / fresh_floor_ms

    # Forward reads Q and L; backward reads Q and L and writes dQ (per-row scalars are noise).
    reference_gbps = same_size_copy_gbps if copy_gbps is None else copy_gbps
    fwd = lambda: fused_loss(*inputs)  # noqa: E731
    loss = fwd()
    bwd = lambda: loss.backward(retain_graph=True)  # noqa: E731
    for name, fn, nbytes in ((f"{FUSED} fwd", fwd, 2 * dq_bytes), (f"{FUSED} bwd", bwd, 3 * dq_bytes)):
        r = BenchResult(name, config, dtype_name, device)
        r.set_timing(measure_time(fn, warmup, reps, device, grad_to_none=[q]))
        r.extra["GB/s"] = achieved_gbps(nbytes, r.ms)
        r.extra["% copy BW"] = 100 * r.extra["GB/s"] / reference_gbps
        results.append(r)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "one tiny shape (the CI profiling pass)", "CPU: timed calls (default 10); CUDA: do_bench ms budget (default 100)")
    parser.add_argument("--shapes", type=shapes_argument("2BxTxV"), help="comma-separated 2BxTxV")
    parser.add_argument("--dtypes", help="comma-separated, from " + ",".join(DTYPES))
    args = parser.parse_args()

    cuda = torch.device(args.device).type == "cuda"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES)
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] if args.quick or not cuda else ["float32", "bfloat16"]
    if cuda:
        warmup, reps = 25, args.reps or 100  # do_bench time budgets in ms
    else:
        warmup, reps = 2, args.reps or 10
    copy_gbps = copy_bandwidth_gbps(args.device) if cuda else None

    info = machine_info(args.device)  # before the run: the date and load it started with
    results: list[BenchResult] = []
    for shape in shapes:
        for dtype_name in dtypes:
            print(f"running {'x'.join(map(str, shape))} {dtype_name} on {args.device} ...", flush=True)
            results += bench_config(shape, dtype_name, args.device, warmup, reps, copy_gbps)

    notes = verdict_lines(TARGETS, results, args.device)
    if copy_gbps is not None:
        info["copy_bandwidth_gbps"] = copy_gbps
        notes.insert(0, f"Measured copy bandwidth: {copy_gbps:.0f} GB/s")
    name = "qadapter_loss_quick" if args.quick else "qadapter_loss"
    save_results(results, name, args.out or default_out_dir(args.device), info, "Q-Adapter loss fwd+bwd", notes,
                 plot=not args.no_plot)


if __name__ == "__main__":
    main()
