"""torch.profiler traces (Chrome trace JSON) of one call of each op and one training step.

Each trace is written as ``trace_<name>.json`` into ``--out`` (next to the benchmark tables) after
one untraced warm-up call. Open one in https://ui.perfetto.dev (or chrome://tracing): one row per
thread, one box per operator (``qadapter::...`` for the fused ops, ``aten::mm`` for the head
products), nested by call; a box's length is its wall time. Small shapes (the CI's quick pass).
Run from the repo root::

    python benchmarks/profile_ops.py --out DIR [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import qadapter_kernels as qk
from bench_training_step import QUICK, build_qadapter, fused_loss, make_batch

ROWS, T, V, H = 4, 32, 4096, 64


def op_calls(device: str) -> dict[str, Callable[[], object]]:
    """Name -> one call of each public op on small fresh inputs."""
    gen = torch.Generator(device).manual_seed(0)
    q = torch.randn(ROWS, T, V, generator=gen, device=device, requires_grad=True)
    base = torch.randn(ROWS, T, V, generator=gen, device=device)
    ids = torch.randint(0, V, (ROWS, T), generator=gen, device=device)
    mask = torch.zeros(ROWS, T, dtype=torch.bool, device=device)
    mask[:, T // 4:] = True
    ha = torch.randn(ROWS * T, H, generator=gen, device=device, requires_grad=True)
    hb = torch.randn(ROWS * T, H, generator=gen, device=device)
    w = torch.randn(V, H, generator=gen, device=device) / H**0.5
    rows_q, rows_l = q.detach()[:, -1], base[:, -1]
    return {
        "residual_q_values": lambda: qk.residual_q_values(q.detach(), base, ids),
        "qadapter_loss_fwd_bwd": lambda: qk.qadapter_loss(q, base, ids, mask).loss.backward(),
        "fused_linear_qadapter_loss_fwd_bwd": lambda: qk.fused_linear_qadapter_loss(
            ha.view(ROWS, T, H), hb.view(ROWS, T, H), w, ids, mask).loss.backward(),
        "combined_logits": lambda: qk.combined_logits(rows_q, rows_l),
        "combined_sample": lambda: qk.combined_sample(rows_q, rows_l, top_p=0.9, generator=0),
        "combined_sample_from_hidden": lambda: qk.combined_sample_from_hidden(
            ha.detach()[:ROWS], hb[:ROWS], w, top_p=0.9, generator=0),
        "combined_log_probs_from_hidden": lambda: qk.combined_log_probs_from_hidden(
            ha.detach(), hb, w, ids.view(-1)),
    }


def training_step(device: str) -> Callable[[], None]:
    model = build_qadapter(QUICK, device)
    batch = make_batch(QUICK.rows, QUICK.seq, model.lm_head.weight.shape[0], device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        fused_loss(model, batch).backward()
        optimizer.step()

    return step


def write_trace(fn: Callable[[], object], path: Path, device: str) -> None:
    fn()  # warm-up: first-call costs (allocations, Triton compilation) stay out of the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the trace_<name>.json files")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calls = {**op_calls(args.device), "training_step": training_step(args.device)}
    for name, fn in calls.items():
        path = out / f"trace_{name}.json"
        write_trace(fn, path, args.device)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
