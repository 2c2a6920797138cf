"""The Q-Adapter loss from hidden states and the shared LM head: [N, V] logits never exist.

    Q = adapter_hidden @ W.T (+ b),  L = base_hidden @ W.T (+ b)        (one W tile for both)
    values, q_taken as in residual_q_values, then the pair pass of pair_loss
    grad(adapter_hidden) = g_q * W[a] + g_V * E,   E = softmax(y) @ W  (kept from the forward)
    grad(W), grad(b): the tiles are recomputed, only when they require grad

With ``base_lse`` (LSE(L) per row from a cached base pass) only the combined stream is formed:
y = W h_c + b' per tile (the logit identity, docs/DESIGN.md §1), one head product instead of two,
and q_taken = h_q . W[a] + b[a] is a gather.

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
    combined_hidden,
    combined_logits_tile,
    logits_tile_compile_options,
    logits_tile_options,
    logits_tiles,
    online_lse_update,
)


@triton.jit
def _fused_linear_fwd_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, base_lse_ptr, values_ptr, q_taken_ptr, lse_y_ptr,
    N, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    COMBINED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """COMBINED: ha_ptr holds h_c and b_ptr b' (accumulation dtype), base_lse_ptr LSE(L); q_taken is not written."""
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
        if COMBINED:
            y = combined_logits_tile(ha_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, HAS_BIAS, DOT_PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_K)
            m_y, s_y = online_lse_update(m_y, s_y, tl.where(col_ok[None, :], y, -float("inf")), 1)
        else:
            q, l = logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                                HAS_BIAS, UPCAST, DOT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
            q_a += tl.sum(tl.where(cols[None, :] == a[:, None], q, 0.0), 1)
            y = tl.where(col_ok[None, :], (q + alpha_0 * l) / alpha_tilde, -float("inf"))
            l = tl.where(col_ok[None, :], l, -float("inf"))
            m_y, s_y = online_lse_update(m_y, s_y, y, 1)
            m_l, s_l = online_lse_update(m_l, s_l, l, 1)
    lse_y = m_y + tl.log(s_y)
    if COMBINED:
        lse_l = tl.load(base_lse_ptr + rows, mask=row_ok, other=0.0)
    else:
        lse_l = m_l + tl.log(s_l)
        # An out-of-range action matched no column: NaN, as on every backend (the public API reports it).
        q_a = tl.where((a >= 0) & (a < V), q_a, float("nan"))
        tl.store(q_taken_ptr + rows, q_a, mask=row_ok)
    tl.store(values_ptr + rows, alpha_tilde * lse_y - alpha_0 * lse_l, mask=row_ok)
    tl.store(lse_y_ptr + rows, lse_y, mask=row_ok)


@triton.jit
def _fused_linear_dq_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, lse_y_ptr, grad_values_ptr, grad_q_taken_ptr, out_ptr,
    row0, chunk_rows, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    COMBINED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ = g_V * softmax(y) + g_q * onehot(a) for rows [row0, row0 + chunk_rows), all of V
    (COMBINED: y from h_c and b' as in the forward kernel)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < chunk_rows
    rows = row0 + local
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    if COMBINED:
        y = combined_logits_tile(ha_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, HAS_BIAS, DOT_PRECISION,
                                 BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        q, l = logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                            HAS_BIAS, UPCAST, DOT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        y = (q + alpha_0 * l) / alpha_tilde
    lse_y = tl.load(lse_y_ptr + rows, mask=row_ok, other=0.0)
    g_v = tl.load(grad_values_ptr + rows, mask=row_ok, other=0.0)
    g_q = tl.load(grad_q_taken_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(actions_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(y - lse_y[:, None])
    dq = g_v[:, None] * p + tl.where(cols[None, :] == a[:, None], g_q[:, None], 0.0)
    out = out_ptr + local[:, None] * V + cols[None, :]
    tl.store(out, dq.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


class _TileInputs:
    """What the Triton kernels' head products read: (h_q, h_b, b) for both streams, or with a cached
    base LSE (h_c, h_c, b') for the combined stream alone (the second pointer is then unused)."""

    def __init__(self, ha, hb, bias, alpha_tilde, alpha_0, combined: bool):
        self.combined = combined
        self.options = {**logits_tile_options(ha, bias), "COMBINED": combined}
        if combined:
            hc, self.bias = combined_hidden(ha, hb, bias, alpha_tilde, alpha_0)
            self.first, self.second = hc, hc
        else:
            self.first, self.second, self.bias = ha, hb, bias

    def pointers(self, w):
        return self.first, self.second, w, self.bias if self.bias is not None else w


def _gathered_q_taken(ha, w, bias, actions, acc):
    """Q[a] = h_q . W[a] (+ b[a]) per row, NaN where a is outside [0, V) (the combined streams form no Q tile)."""
    valid = (actions >= 0) & (actions < w.shape[0])
    safe = torch.where(valid, actions, 0)
    q = (ha.to(acc) * w.index_select(0, safe).to(acc)).sum(1)
    if bias is not None:
        q = q + bias.index_select(0, safe).to(acc)
    return torch.where(valid, q, float("nan"))


def _dq_chunks(tiles: _TileInputs, w, actions, lse_y, grad_values, grad_q_taken, alpha_tilde, alpha_0, chunk_rows):
    """Yields (row0, dQ [rows, V] in W's dtype) over row chunks, one reused buffer."""
    n, vocab = tiles.first.shape[0], w.shape[0]
    buffer = torch.empty(min(chunk_rows, n) * vocab, dtype=w.dtype, device=w.device)
    for row0 in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - row0)
        dq = buffer[: rows * vocab].view(rows, vocab)
        _fused_linear_dq_kernel[(triton.cdiv(rows, LOGITS_BLOCK_M), triton.cdiv(vocab, LOGITS_BLOCK_N))](
            *tiles.pointers(w), actions, lse_y, grad_values, grad_q_taken, dq,
            row0, rows, w.shape[1], vocab, alpha_tilde, alpha_0, **tiles.options,
        )
        yield row0, dq


def _check_base_lse(base_lse, n: int, acc):
    """base_lse as a contiguous [N] tensor in the accumulation dtype (None stays None)."""
    if base_lse is None:
        return None
    if not base_lse.is_floating_point() or tuple(base_lse.shape) != (n,):
        raise ValueError(f"base_lse must be a float [N] = [{n}] tensor (N from adapter_hidden), got "
                         f"{base_lse.dtype} {list(base_lse.shape)}")
    return base_lse.to(acc).contiguous()


def _triton_fwd(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected,
                base_lse=None):
    ha, hb, w, actions = ha.contiguous(), hb.contiguous(), w.contiguous(), actions.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, hidden = ha.shape
    acc = acc_dtype(ha.dtype)
    base_lse = _check_base_lse(base_lse, n, acc)
    values, q_taken, lse_y = (torch.empty(n, dtype=acc, device=ha.device) for _ in range(3))
    expected = torch.zeros((n if with_expected else 0, hidden), dtype=acc, device=ha.device)
    if n == 0:
        return values, q_taken, lse_y, expected
    tiles = _TileInputs(ha, hb, bias, alpha_tilde, alpha_0, base_lse is not None)
    _fused_linear_fwd_kernel[(triton.cdiv(n, LOGITS_BLOCK_M),)](
        *tiles.pointers(w), actions, base_lse if tiles.combined else values, values, q_taken, lse_y,
        n, hidden, w.shape[0], alpha_tilde, alpha_0, **tiles.options,
    )
    if tiles.combined:
        q_taken = _gathered_q_taken(ha, w, bias, actions, acc)
    if with_expected:
        ones, zeros = torch.ones_like(values), torch.zeros_like(values)
        for row0, p in _dq_chunks(tiles, w, actions, lse_y, ones, zeros, alpha_tilde, alpha_0, tile_rows):
            expected[row0 : row0 + p.shape[0]] = (p @ w).to(acc)
    return values, q_taken, lse_y, expected


def _triton_bwd(grad_values, grad_q_taken, ha, hb, w, bias, actions, lse_y, expected, alpha_tilde, alpha_0,
                tile_rows, tile_vocab, output_mask, base_lse=None):
    ha, hb, w, actions = ha.contiguous(), hb.contiguous(), w.contiguous(), actions.contiguous()
    bias = bias.contiguous() if bias is not None else None
    acc = acc_dtype(ha.dtype)
    combined = _check_base_lse(base_lse, ha.shape[0], acc) is not None
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
        tiles = _TileInputs(ha, hb, bias, alpha_tilde, alpha_0, combined)
        for row0, dq in _dq_chunks(tiles, w, actions, lse_y.contiguous(), grad_values, grad_q_taken,
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
def _fused_linear_fake(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected,
                       base_lse=None):
    n, hidden = ha.shape
    acc = acc_dtype(ha.dtype)
    per_row = tuple(ha.new_empty(n, dtype=acc) for _ in range(3))
    return (*per_row, ha.new_empty((n if with_expected else 0, hidden), dtype=acc))


@torch.library.register_fake("qadapter::fused_linear_residual_q_values_backward")
def _fused_linear_backward_fake(grad_values, grad_q_taken, ha, hb, w, bias, actions, lse_y, expected,
                                alpha_tilde, alpha_0, tile_rows, tile_vocab, output_mask, base_lse=None):
    return (
        torch.empty_like(ha) if output_mask[0] else ha.new_empty(0),
        torch.empty_like(w) if output_mask[1] else w.new_empty(0),
        w.new_empty(w.shape[0]) if output_mask[2] else w.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, _, *rest = inputs
    base_lse = rest[0] if rest else None
    _, _, lse_y, expected = output
    ctx.save_for_backward(ha, hb, w, bias, actions, lse_y, expected, base_lse)
    ctx.params = (alpha_tilde, alpha_0, tile_rows, tile_vocab)


def _make_backward(backward_kernel):
    """Autograd backward over a backward kernel (the dispatcher op or the Triton launcher).

    The auxiliary output `expected` carries no gradient (the public API never exposes it).
    """

    def backward(ctx, grad_values, grad_q_taken, grad_lse_y, _grad_expected):
        ha, hb, w, bias, actions, lse_y, expected, base_lse = ctx.saved_tensors
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
            tile_rows, tile_vocab, output_mask, base_lse,
        )
        pick = lambda wanted, g: g if wanted else None  # noqa: E731
        # base_lse gets no gradient: like base_hidden, it comes from the frozen base model.
        return (pick(output_mask[0], grad_h), None, pick(output_mask[1], grad_w), pick(output_mask[2], grad_b),
                None, None, None, None, None, None, None)

    return backward


_InterpretedFusedLinear = register_differentiable_op(
    "fused_linear_residual_q_values", _triton_fwd, _triton_bwd, _setup_context, _make_backward
)


def fused_linear_rows(ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected,
                      via_dispatcher: bool, base_lse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, q_taken), each [N], from [N, H] hidden states and the LM head; no argument checks.
    ``base_lse``: [N] LSE(L) from a cached base pass (one head product per tile instead of two)."""
    args = (ha, hb, w, bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab, with_expected, base_lse)
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
            for combined in (False, True):  # combined: h_c and b' come in the accumulation dtype
                opts = {**logits_tile_compile_options(dt, has_bias), "COMBINED": combined}
                hidden = {**pointers(["ha_ptr", "hb_ptr", "b_ptr"], acc if combined else dt), "w_ptr": f"*{dt}",
                          "actions_ptr": "*i64", **scalars("fp32", "alpha_tilde", "alpha_0")}
                forward.append(KernelVariant({**hidden, **pointers(["base_lse_ptr", "values_ptr", "q_taken_ptr",
                                                                    "lse_y_ptr"], acc),
                                              **scalars("i32", "N", "H", "V")}, opts))
                dq.append(KernelVariant({**hidden,
                                         **pointers(["lse_y_ptr", "grad_values_ptr", "grad_q_taken_ptr"], acc),
                                         "out_ptr": f"*{dt}", **scalars("i32", "row0", "chunk_rows", "H", "V")},
                                        opts))
    register_triton_kernel(_fused_linear_fwd_kernel, forward)
    register_triton_kernel(_fused_linear_dq_kernel, dq)


_register_compile_variants()
