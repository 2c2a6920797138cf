"""The Q-Adapter loss from hidden states and the shared LM head: [N, V] logits never exist.

    Q = adapter_hidden @ W.T (+ b),  L = base_hidden @ W.T (+ b)        (one W tile for both)
    values, q_taken as in residual_q_values, then the pair pass of pair_loss
    grad(adapter_hidden) = g_q * W[a] + g_V * E,   E = softmax(y) @ W  (kept from the forward)
    grad(W), grad(b): the tiles are recomputed, only when they require grad

Reads top-down: Triton kernels -> launchers -> CUDA registration, fake kernels, autograd ->
the unchecked entry point. The CPU kernels are C++ (csrc/fused_linear.cpp). On CUDA the forward is one
Triton kernel computing both streams per W tile with tl.dot; E and grad(W) come from
[chunk, V] dQ blocks written by a second Triton kernel and multiplied by cuBLAS, the chunk
sized by the memory budget.
"""
import torch
import triton
import triton.language as tl

from .backend import acc_dtype
from .registration import FLOAT_TYPES, KernelVariant, pointers, register_differentiable_op, register_triton_kernel, scalars
from .triton_helpers import (
    LOGITS_BLOCK_M,
    LOGITS_BLOCK_N,
    logits_tile_compile_options,
    logits_tile_options,
    logits_tiles,
    online_lse_update,
)


@triton.jit
def _fused_linear_fwd_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, values_ptr, q_taken_ptr, lse_y_ptr,
    N, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    a = tl.load(actions_ptr + rows, mask=row_ok, other=-1)
    m_y = tl.full([BLOCK_M], -float("inf"), ACC)
    m_l = tl.full([BLOCK_M], -float("inf"), ACC)
    s_y = tl.zeros([BLOCK_M], dtype=ACC)
    s_l = tl.zeros([BLOCK_M], dtype=ACC)
    q_a = tl.zeros([BLOCK_M], dtype=ACC)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        q, l = logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                            HAS_BIAS, UPCAST, DOT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        q_a += tl.sum(tl.where(cols[None, :] == a[:, None], q, 0.0), 1)
        y = tl.where(col_ok[None, :], (q + alpha_0 * l) / alpha_tilde, -float("inf"))
        l = tl.where(col_ok[None, :], l, -float("inf"))
        m_y, s_y = online_lse_update(m_y, s_y, y, 1)
        m_l, s_l = online_lse_update(m_l, s_l, l, 1)
    lse_y = m_y + tl.log(s_y)
    tl.store(values_ptr + rows, alpha_tilde * lse_y - alpha_0 * (m_l + tl.log(s_l)), mask=row_ok)
    # An out-of-range action matched no column: NaN, as on every backend (the public API reports it).
    q_a = tl.where((a >= 0) & (a < V), q_a, float("nan"))
    tl.store(q_taken_ptr + rows, q_a, mask=row_ok)
    tl.store(lse_y_ptr + rows, lse_y, mask=row_ok)


@triton.jit
def _fused_linear_dq_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, lse_y_ptr, grad_values_ptr, grad_q_taken_ptr, out_ptr,
    row0, chunk_rows, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ = g_V * softmax(y) + g_q * onehot(a) for rows [row0, row0 + chunk_rows), all of V."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < chunk_rows
    rows = row0 + local
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    q, l = logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                        HAS_BIAS, UPCAST, DOT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    lse_y = tl.load(lse_y_ptr + rows, mask=row_ok, other=0.0)
    g_v = tl.load(grad_values_ptr + rows, mask=row_ok, other=0.0)
    g_q = tl.load(grad_q_taken_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(actions_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp((q + alpha_0 * l) / alpha_tilde - lse_y[:, None])
    dq = g_v[:, None] * p + tl.where(cols[None, :] == a[:, None], g_q[:, None], 0.0)
    out = out_ptr + local[:, None] * V + cols[None, :]
    tl.store(out, dq.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _dq_chunks(ha, hb, w, bias, actions, lse_y, grad_values, grad_q_taken, alpha_tilde, alpha_0, chunk_rows):
    """Yields (row0, dQ [rows, V] in W's dtype) over row chunks, one reused buffer."""
    n, vocab = ha.shape[0], w.shape[0]
    buffer = torch.empty(min(chunk_rows, n) * vocab, dtype=w.dtype, device=w.device)
    for row0 in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - row0)
        dq = buffer[: rows * vocab].view(rows, vocab)
        _fused_linear_dq_kernel[(triton.cdiv(rows, LOGITS_BLOCK_M), triton.cdiv(vocab, LOGITS_BLOCK_N))](
            ha, hb, w, bias if bias is not None else w, actions, lse_y, grad_values, grad_q_taken, dq,
            row0, rows, ha.shape[1], vocab, alpha_tilde, alpha_0, **logits_tile_options(ha, bias),
        )
        yield row0, dq


def _triton_fwd(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected):
    ha, hb, w, actions = ha.contiguous(), hb.contiguous(), w.contiguous(), actions.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, hidden = ha.shape
    acc = acc_dtype(ha.dtype)
    values, q_taken, lse_y = (torch.empty(n, dtype=acc, device=ha.device) for _ in range(3))
    expected = torch.zeros((n if with_expected else 0, hidden), dtype=acc, device=ha.device)
    if n == 0:
        return values, q_taken, lse_y, expected
    _fused_linear_fwd_kernel[(triton.cdiv(n, LOGITS_BLOCK_M),)](
        ha, hb, w, bias if bias is not None else w, actions, values, q_taken, lse_y,
        n, hidden, w.shape[0], alpha_tilde, alpha_0, **logits_tile_options(ha, bias),
    )
    if with_expected:
        ones, zeros = torch.ones_like(values), torch.zeros_like(values)
        for row0, p in _dq_chunks(ha, hb, w, bias, actions, lse_y, ones, zeros, alpha_tilde, alpha_0, tile_rows):
            expected[row0 : row0 + p.shape[0]] = (p @ w).to(acc)
    return values, q_taken, lse_y, expected


def _triton_bwd(grad_values, grad_q_taken, ha, hb, w, bias, actions, lse_y, expected, alpha_tilde, alpha_0,
                tile_rows, tile_vocab, output_mask):
    ha, hb, w, actions = ha.contiguous(), hb.contiguous(), w.contiguous(), actions.contiguous()
    bias = bias.contiguous() if bias is not None else None
    acc = acc_dtype(ha.dtype)
    grad_values, grad_q_taken = grad_values.to(acc).contiguous(), grad_q_taken.to(acc).contiguous()
    empty = ha.new_empty(0)
    grad_hidden, grad_weight, grad_bias = empty, w.new_empty(0), w.new_empty(0)
    if output_mask[0]:
        if expected.shape[0] != ha.shape[0]:
            raise ValueError("the forward ran without with_expected, so grad(adapter_hidden) is unavailable")
        # No one-hot term (and no W row read) for an out-of-range action: its q_taken was NaN.
        valid = (actions >= 0) & (actions < w.shape[0])
        w_taken = w.index_select(0, torch.where(valid, actions, 0)).to(acc)
        grad_hidden = (torch.where(valid, grad_q_taken, 0.0)[:, None] * w_taken
                       + grad_values[:, None] * expected).to(ha.dtype)
    if output_mask[1] or output_mask[2]:
        # grad(W) accumulates across row chunks in fp32 (fp64 for fp64), cast to W's dtype once.
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if output_mask[1] else None
        grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if output_mask[2] else None
        for row0, dq in _dq_chunks(ha, hb, w, bias, actions, lse_y.contiguous(), grad_values, grad_q_taken,
                                   alpha_tilde, alpha_0, tile_rows):
            if grad_w is not None:
                chunk = ha[row0 : row0 + dq.shape[0]]
                if grad_w.dtype == w.dtype:
                    grad_w.addmm_(dq.t(), chunk)
                else:
                    grad_w += torch.mm(dq.t(), chunk).to(acc)
            if grad_b is not None:
                grad_b += dq.sum(0, dtype=acc)
        grad_weight = grad_w.to(w.dtype) if grad_w is not None else grad_weight
        grad_bias = grad_b.to(w.dtype) if grad_b is not None else grad_bias
    return grad_hidden, grad_weight, grad_bias


@torch.library.register_fake("qadapter::fused_linear_residual_q_values")
def _fused_linear_fake(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected):
    n, hidden = ha.shape
    acc = acc_dtype(ha.dtype)
    per_row = tuple(ha.new_empty(n, dtype=acc) for _ in range(3))
    return (*per_row, ha.new_empty((n if with_expected else 0, hidden), dtype=acc))


@torch.library.register_fake("qadapter::fused_linear_residual_q_values_backward")
def _fused_linear_backward_fake(grad_values, grad_q_taken, ha, hb, w, bias, actions, lse_y, expected,
                                alpha_tilde, alpha_0, tile_rows, tile_vocab, output_mask):
    return (
        torch.empty_like(ha) if output_mask[0] else ha.new_empty(0),
        torch.empty_like(w) if output_mask[1] else w.new_empty(0),
        w.new_empty(w.shape[0]) if output_mask[2] else w.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, _ = inputs
    _, _, lse_y, expected = output
    ctx.save_for_backward(ha, hb, w, bias, actions, lse_y, expected)
    ctx.params = (alpha_tilde, alpha_0, tile_rows, tile_vocab)


def _make_backward(backward_kernel):
    """Autograd backward over a backward kernel (the dispatcher op or the Triton launcher).

    The auxiliary output `expected` carries no gradient (the public API never exposes it).
    """

    def backward(ctx, grad_values, grad_q_taken, grad_lse_y, _grad_expected):
        ha, hb, w, bias, actions, lse_y, expected = ctx.saved_tensors
        alpha_tilde, alpha_0, tile_rows, tile_vocab = ctx.params
        zeros = lse_y.new_zeros(lse_y.shape)
        grad_values = zeros if grad_values is None else grad_values
        grad_q_taken = zeros if grad_q_taken is None else grad_q_taken
        if grad_lse_y is not None:
            grad_values = grad_values + grad_lse_y / alpha_tilde
        needs = ctx.needs_input_grad
        output_mask = [needs[0], needs[2], bias is not None and needs[3]]
        grad_h, grad_w, grad_b = backward_kernel(
            grad_values, grad_q_taken, ha, hb, w, bias, actions, lse_y, expected, alpha_tilde, alpha_0,
            tile_rows, tile_vocab, output_mask,
        )
        pick = lambda wanted, g: g if wanted else None  # noqa: E731
        return (pick(output_mask[0], grad_h), None, pick(output_mask[1], grad_w), pick(output_mask[2], grad_b),
                None, None, None, None, None, None)

    return backward


_InterpretedFusedLinear = register_differentiable_op(
    "fused_linear_residual_q_values", _triton_fwd, _triton_bwd, _setup_context, _make_backward
)


def fused_linear_rows(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected,
                      via_dispatcher: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, q_taken), each [N], from [N, H] hidden states and the LM head; no argument checks."""
    args = (ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected)
    if via_dispatcher:
        values, q_taken, _, _ = torch.ops.qadapter.fused_linear_residual_q_values(*args)
    else:
        values, q_taken, _, _ = _InterpretedFusedLinear.apply(*args)
    return values, q_taken


def _register_compile_variants() -> None:
    forward, dq = [], []
    for dt in FLOAT_TYPES:
        acc = "fp64" if dt == "fp64" else "fp32"
        for has_bias in (False, True):
            opts = logits_tile_compile_options(dt, has_bias)
            hidden = {**pointers(["ha_ptr", "hb_ptr", "w_ptr", "b_ptr"], dt), "actions_ptr": "*i64",
                      **scalars("fp32", "alpha_tilde", "alpha_0")}
            forward.append(KernelVariant({**hidden, **pointers(["values_ptr", "q_taken_ptr", "lse_y_ptr"], acc),
                                          **scalars("i32", "N", "H", "V")}, opts))
            dq.append(KernelVariant({**hidden, **pointers(["lse_y_ptr", "grad_values_ptr", "grad_q_taken_ptr"], acc),
                                     "out_ptr": f"*{dt}", **scalars("i32", "row0", "chunk_rows", "H", "V")}, opts))
    register_triton_kernel(_fused_linear_fwd_kernel, forward)
    register_triton_kernel(_fused_linear_dq_kernel, dq)


_register_compile_variants()
