"""The customised policy's log-probabilities of given tokens, from hidden states (docs/DESIGN.md §1 (the logit identity)).

    log pi~(a | s) = y[a] - LSE(y),   y = W h_c + b',   h_c = (h_q + alpha_0 h_b) / alpha_tilde

One head product on h_c per tile and a running logsumexp per row: no [N, V] logits row is ever
stored (what scoring, lm-eval log-likelihoods and per-token log-probs of ``generate`` need).
The CPU kernel is C++ (csrc/log_probs.cpp); the Triton kernel below gives each program a block
of rows and sweeps the vocabulary. Not differentiable (scoring only). A token id outside
[0, V) gives NaN (never an out-of-bounds read).

Reads top-down: Triton kernel -> launcher -> CUDA and fake registration -> the unchecked entry point.
"""
import torch
import triton
import triton.language as tl

from .registration import FLOAT_TYPES, KernelVariant, pointers, register_cuda, register_triton_kernel, scalars
from .triton_helpers import (
    combined_hidden,
    combined_logits_tile,
    combined_tile_compile_options,
    combined_tile_options,
    online_lse_update,
)


@triton.jit
def _combined_log_probs_kernel(hc_ptr, w_ptr, b_ptr, tokens_ptr, out_ptr, N, H, V, HAS_BIAS: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tokens = tl.load(tokens_ptr + rows, mask=row_ok, other=-1)
    acc_type = hc_ptr.dtype.element_ty
    running_max = tl.full([BLOCK_M], -float("inf"), acc_type)
    running_sum = tl.zeros([BLOCK_M], acc_type)
    picked = tl.full([BLOCK_M], float("nan"), acc_type)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        y = combined_logits_tile(hc_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, HAS_BIAS, DOT_PRECISION,
                                 BLOCK_M, BLOCK_N, BLOCK_K)
        y = tl.where(col_ok[None, :], y, -float("inf"))
        running_max, running_sum = online_lse_update(running_max, running_sum, y, 1)
        hit = (cols[None, :] == tokens[:, None]) & col_ok[None, :]  # an id outside [0, V) never hits: NaN stays
        picked = tl.where(tl.max(hit.to(tl.int32), 1) > 0, tl.sum(tl.where(hit, y, 0.0), 1), picked)
    tl.store(out_ptr + rows, picked - (running_max + tl.log(running_sum)), mask=row_ok)


def _triton_combined_log_probs_from_hidden(ha, hb, w, bias, tokens, alpha_tilde, alpha_0, tile_rows, tile_vocab):
    hc, bc = combined_hidden(ha, hb, bias, alpha_tilde, alpha_0)
    rows, hidden = hc.shape
    out = torch.empty(rows, dtype=hc.dtype, device=hc.device)
    if rows:
        opts = combined_tile_options(hc, bc)
        _combined_log_probs_kernel[(triton.cdiv(rows, opts["BLOCK_M"]),)](
            hc, w.contiguous(), bc if bc is not None else hc, tokens.contiguous(), out, rows, hidden, w.shape[0], **opts)
    return out


register_cuda("combined_log_probs_from_hidden", _triton_combined_log_probs_from_hidden)


@torch.library.register_fake("qadapter::combined_log_probs_from_hidden")
def _combined_log_probs_from_hidden_fake(ha, hb, w, bias, tokens, alpha_tilde, alpha_0, tile_rows, tile_vocab):
    return ha.new_empty(ha.shape[0], dtype=torch.float64 if ha.dtype == torch.float64 else torch.float32)


def log_probs_from_hidden_rows(adapter_hidden, base_hidden, weight, bias, tokens, alpha_tilde: float, alpha_0: float,
                               tile_rows: int, tile_vocab: int, via_dispatcher: bool) -> torch.Tensor:
    """log pi~(tokens) of [N, H] hidden states, int64 tokens [N]; NaN for an id outside [0, V). No checks."""
    args = (adapter_hidden, base_hidden, weight, bias, tokens, alpha_tilde, alpha_0, tile_rows, tile_vocab)
    if via_dispatcher:
        return torch.ops.qadapter.combined_log_probs_from_hidden(*args)
    return _triton_combined_log_probs_from_hidden(*args)


register_triton_kernel(_combined_log_probs_kernel, [
    KernelVariant({**pointers(["hc_ptr", "b_ptr", "out_ptr"], acc), "w_ptr": f"*{dt}", "tokens_ptr": "*i64",
                   **scalars("i32", "N", "H", "V")}, combined_tile_compile_options(acc, has_bias))
    for dt in FLOAT_TYPES for acc in ["fp64" if dt == "fp64" else "fp32"] for has_bias in (False, True)
])
