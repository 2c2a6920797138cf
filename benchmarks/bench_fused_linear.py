"""Q-Adapter loss from hidden states and the shared LM head: fwd+bwd time and peak memory.

- ``authors_eager``:    materialise ``Q = adapter_hidden @ W.T`` and ``L = base_hidden @ W.T`` (the
                        base under ``torch.no_grad``, as the authors should have), then
                        ``reference.authors_qadapter_loss(Q, L, ...)`` in eager PyTorch
- ``authors_compile``:  the same function (GEMMs included) under ``torch.compile``
- ``matmul_only``:      only the GEMMs of the materialised path: the forward Q and L matmuls and the
                        backward ``dH = dQ @ W`` with a fixed random dQ (plus ``dW = dQ.T @ H`` with
                        ``--weight-grad``): the matmul work no implementation avoids (GPU target)
- ``qadapter_kernels``: ``qadapter_kernels.fused_linear_qadapter_loss(..., variant="official", length_norm="padded")``
                        (C++ on CPU, Triton on CUDA), which never builds an [N, V] tensor

adapter_hidden requires grad; base_hidden and W do not (the Q-Adapter case: a frozen LM head
shared by both passes) unless ``--weight-grad``, which makes W require grad too. All providers
but matmul_only compute the same loss ("official" variant); the loss and the gradients are
asserted to agree with the eager path before timing. Peak memory is what a call allocates
beyond its inputs (the gradients it leaves in ``.grad`` included).

Shapes are ``2BxTxHxV`` (N = 2B*T rows). CPU defaults: SmolLM2-135M's head (H=576, V=49152)
at 2x512, and Llama-3.1-8B's head (H=4096, V=128256) at 2x64: one GEMM of 1024 x 4096 x
128256 takes ~11 s on the 2-core development machines (~95 GFLOP/s), so at 2x512 a single
fwd+bwd of one provider takes ~35 s and the run ~15 min; 2x512 stays the GPU default (and can
be asked for with ``--shapes``). The fused op's scratch is a fixed tile budget (64 MiB by
default) whatever N is, so its peak is <= 10% of the eager one only once the eager path's
[N, V] tensors are large (about N*V >= 1e8): true at 2x512 for SmolLM2, not at 2x64 for Llama,
where the memory figure is reported as INFO (the targets are stated at 2x512). Heavy shapes (> 100 GFLOP of
GEMMs per call) get 3 timed reps and no extra warm-up on CPU: the agreement check already ran
each provider once. CUDA defaults to bfloat16 (``--dtypes float32,bfloat16`` for both). The
whole CPU default run takes ~3 min. Run from the repo root::

    python benchmarks/bench_fused_linear.py [--quick] [--shapes 2x512x576x49152,...] [--dtypes float32]
        [--weight-grad] [--reps N] [--no-plot]
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
    default_out_dir,
    machine_info,
    measure_peak_memory,
    measure_time,
    save_results,
    shapes_argument,
)

Shape = tuple[int, int, int, int]  # (2B, T, H, V)
Inputs = tuple[torch.Tensor, ...]  # adapter_hidden, base_hidden, W, input_ids, loss_mask

CPU_SHAPES: list[Shape] = [(2, 512, 576, 49152), (2, 64, 4096, 128256)]
GPU_SHAPES: list[Shape] = [(2, 512, 576, 49152), (2, 512, 4096, 128256), (8, 1024, 4096, 128256)]
QUICK_SHAPES: list[Shape] = [(2, 64, 64, 4096)]
EAGER, COMPILE, MATMUL, FUSED = "authors_eager", "authors_compile", "matmul_only", "qadapter_kernels"
HEAVY_FLOP = 1e11  # GEMM FLOPs of one fwd+bwd above which CPU runs use few reps

# The performance targets are stated at N = 2B x T = 2x512; other shapes report the figure as INFO.
TARGETS = [
    Target(FUSED, "peak/eager peak", "<=", 0.10, "cpu", where(shape="2x512")),
    Target(FUSED, "x compile", "<=", 1.8, "cpu", where(shape="2x512")),
    Target(FUSED, "x matmul_only", "<=", 1.3, "cuda", where(shape="2x512")),
    Target(FUSED, "peak/eager peak", "<=", 0.10, "cuda", where(shape="2x512")),
]


def shape_str(shape: Shape) -> str:
    return f"{shape[0]}x{shape[1]}x{shape[2]}x{shape[3]}"


def authors_loss(ha, hb, w, input_ids, loss_mask):
    """Both logits materialised ([2B, T, V] each), then the authors' formula."""
    q = ha @ w.T
    with torch.no_grad():
        base = hb @ w.T
    return reference.authors_qadapter_loss(q, base, input_ids, loss_mask)


def fused_loss(ha, hb, w, input_ids, loss_mask):
    """The fused op on the authors' variant, the fast path for the tensors' device."""
    return qk.fused_linear_qadapter_loss(ha, hb, w, input_ids, loss_mask, variant="official", length_norm="padded",
                                         backend=None).loss


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, weight_grad: bool, seed: int = 0) -> Inputs:
    """Hidden states with LM-head-like scale (logits of std ~2), a random head and a realistic
    batch: rows 0..B-1 chosen, B..2B-1 rejected; the first quarter of each row is prompt, the
    rest response; the last row is right-padded by T/8."""
    B2, T, H, V = shape
    torch.manual_seed(seed)
    ha = torch.randn(B2, T, H, dtype=dtype, device=device).requires_grad_()
    hb = (ha.detach() + 0.1 * torch.randn_like(ha)).to(dtype)  # the adapter moves the hidden state a little
    w = (torch.randn(V, H, device=device) * (2 / H**0.5)).to(dtype).requires_grad_(weight_grad)
    input_ids = torch.randint(0, V, (B2, T), device=device)
    loss_mask = torch.zeros(B2, T, dtype=torch.bool, device=device)
    loss_mask[:, T // 4 :] = True
    loss_mask[-1, T - T // 8 :] = False
    input_ids[-1, T - T // 8 :] = 0  # pad id
    return ha, hb, w, input_ids, loss_mask


def grad_leaves(inputs: Inputs) -> list[torch.Tensor]:
    return [t for t in inputs[:3] if t.requires_grad]


def matmul_only_fn(inputs: Inputs) -> Callable[[], torch.Tensor]:
    """The GEMMs alone, no autograd: Q and L forward, dH = dQ @ W (and dW = dQ.T @ H) backward,
    dQ fixed and random. Q and L stay alive to the end, as autograd would keep Q."""
    ha, hb, w = (t.detach() for t in inputs[:3])
    weight_grad = inputs[2].requires_grad
    H, V = w.shape[1], w.shape[0]
    ha2, hb2 = ha.reshape(-1, H), hb.reshape(-1, H)
    dq = torch.randn(ha2.shape[0], V, dtype=w.dtype, device=w.device) * 1e-4

    def run():
        q = ha2 @ w.T
        base = hb2 @ w.T
        dh = dq @ w
        dw = dq.T @ ha2 if weight_grad else None
        return q, base, dh, dw

    return run


def check_agreement(fns: dict[str, Callable], inputs: Inputs, dtype: torch.dtype) -> None:
    """Assert every provider's loss and gradients match the eager baseline's (also warms up compile)."""
    leaves = grad_leaves(inputs)
    loss_rtol, grad_rtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-3, 2e-2)
    ref = None
    for name, fn in fns.items():
        for t in leaves:
            t.grad = None
        loss = fn(*inputs)
        loss.backward()
        got = (loss.detach().double(), [t.grad for t in leaves])
        for t in leaves:
            t.grad = None
        if ref is None:
            ref = got
            continue
        assert torch.allclose(got[0], ref[0], rtol=loss_rtol, atol=0), f"{name}: loss {got[0].item()} != {ref[0].item()}"
        for leaf_name, g, r in zip(("adapter_hidden", "base_hidden", "W"), got[1], ref[1]):
            err = (g.float() - r.float()).abs().max().item()
            scale = r.float().abs().max().item()
            assert err <= grad_rtol * scale, f"{name}: grad({leaf_name}) max error {err / scale:.2e} of max |grad|"
        print(f"  {name} agrees with {EAGER}: loss {got[0].item():.6g}", flush=True)


def bench_config(shape: Shape, dtype_name: str, device: str, warmup: int | None, reps: int | None,
                 weight_grad: bool) -> list[BenchResult]:
    """All providers on one shape and dtype; ratio columns filled in."""
    dtype = DTYPES[dtype_name]
    cuda = torch.device(device).type == "cuda"
    B2, T, H, V = shape
    heavy = 2 * B2 * T * H * V * (4 if weight_grad else 3) > HEAVY_FLOP
    if cuda:
        warmup, reps = warmup or 25, reps or 100  # do_bench time budgets in ms
    else:
        warmup = (0 if heavy else 1) if warmup is None else warmup
        reps = reps or (3 if heavy else 10)
    inputs = make_inputs(shape, dtype, device, weight_grad)
    leaves = grad_leaves(inputs)
    config = {"shape": f"{B2}x{T}", "H": H, "V": V}
    torch._dynamo.reset()  # drop kernels compiled for earlier configs
    # Static shapes: each config gets kernels specialised to it, the compile baseline's best case.
    loss_fns = {EAGER: authors_loss, COMPILE: torch.compile(authors_loss, dynamic=False), FUSED: fused_loss}
    check_agreement(loss_fns, inputs, dtype)

    calls: dict[str, Callable[[], object]] = {}
    for name, fn in loss_fns.items():
        calls[name] = lambda fn=fn: fn(*inputs).backward()
    calls[MATMUL] = matmul_only_fn(inputs)
    order = [EAGER, COMPILE, MATMUL, FUSED]
    if not cuda:
        calls[MATMUL]()  # its only warm-up when heavy (the others ran in the agreement check)

    results = []
    for name in order:
        print(f"  timing {name} ({reps} reps) ...", flush=True)
        r = BenchResult(name, config, dtype_name, device)
        # grad_to_none frees the gradients between calls, outside the timed region.
        r.set_timing(measure_time(calls[name], warmup, reps, device, grad_to_none=leaves))
        for t in leaves:
            t.grad = None  # else the old gradients are freed inside the measurement
        r.peak_bytes = measure_peak_memory(calls[name], device)
        for t in leaves:
            t.grad = None
        results.append(r)
    by_name = {r.provider: r for r in results}
    for r in results:
        r.extra["x eager"] = r.ms / by_name[EAGER].ms
        r.extra["x compile"] = r.ms / by_name[COMPILE].ms
        r.extra["x matmul_only"] = r.ms / by_name[MATMUL].ms
        r.extra["peak/eager peak"] = r.peak_bytes / by_name[EAGER].peak_bytes
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "one tiny shape (a smoke run, seconds)", "CPU: timed calls (default 10, 3 for heavy shapes); CUDA: do_bench ms budget (default 100)")
    parser.add_argument("--shapes", type=shapes_argument("2BxTxHxV"), help="comma-separated 2BxTxHxV")
    parser.add_argument("--dtypes", help="comma-separated, from " + ",".join(DTYPES))
    parser.add_argument("--weight-grad", action="store_true", help="W requires grad too (default: frozen head)")
    parser.add_argument("--warmup", type=int, help="CPU: untimed calls after the agreement check (default 1, 0 for heavy shapes)")
    args = parser.parse_args()

    cuda = torch.device(args.device).type == "cuda"
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if cuda else CPU_SHAPES)
    dtypes = args.dtypes.split(",") if args.dtypes else ["float32"] if args.quick or not cuda else ["bfloat16"]

    info = machine_info(args.device)  # before the run: the date and load it started with
    results: list[BenchResult] = []
    for shape in shapes:
        for dtype_name in dtypes:
            print(f"running {shape_str(shape)} {dtype_name} on {args.device}"
                  f"{' (W requires grad)' if args.weight_grad else ''} ...", flush=True)
            results += bench_config(shape, dtype_name, args.device, args.warmup, args.reps, args.weight_grad)

    notes = [
        "adapter_hidden requires grad; " + ("W requires grad too (--weight-grad)." if args.weight_grad
                                            else "base_hidden and W (the shared LM head) are frozen."),
        "peak MiB: allocated beyond the inputs during one fwd+bwd (gradients included); "
        "matmul_only: Q, L, dH" + (", dW" if args.weight_grad else "") + " GEMMs only (no loss).",
        "The fused scratch is the tile budget (QADAPTER_TILE_BUDGET_MB, default 64 MiB) plus [N, H] whatever N "
        "is, so at small N its peak is a larger fraction of a small eager peak.",
        *verdict_lines(TARGETS, results, args.device),
    ]
    name = "fused_linear" + ("_wgrad" if args.weight_grad else "") + ("_quick" if args.quick else "")
    save_results(results, name, args.out or default_out_dir(args.device), info,
                 "Fused-linear Q-Adapter loss fwd+bwd (from hidden states)", notes, plot=not args.no_plot)


if __name__ == "__main__":
    main()
