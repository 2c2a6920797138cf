"""The Q-Adapter loss from hidden states and the shared LM head: [N, V] logits never exist.

    Q = adapter_hidden @ W.T (+ b),  L = base_hidden @ W.T (+ b)        (one W tile for both)
    values, q_taken as in residual_q_values, then the pair pass of pair_loss
    grad(adapter_hidden) = g_q * W[a] + g_V * E,   E = softmax(y) @ W  (kept from the forward)
    grad(W), grad(b): the tiles are recomputed, only when they require grad

Reads top-down: Triton kernels -> launchers -> CUDA registration, fake kernels, autograd ->
public function. The CPU kernels are C++ (csrc/fused_linear.cpp). On CUDA the forward is one
Triton kernel computing both streams per W tile with tl.dot; E and grad(W) come from
[chunk, V] dQ blocks written by a second Triton kernel and multiplied by cuBLAS, the chunk
sized by the memory budget.
"""
import os

import torch
import triton
import triton.language as tl

from . import _C  # noqa: F401  (loads the op schemas and CPU kernels)
from . import reference
from ._backend import TRITON_INTERPRETED, resolve_backend, through_dispatcher
from ._registration import online_lse_update, register_differentiable_op
from ._checks import (
    acc_dtype,
    check_float_tensor,
    check_index_tensor,
    check_same_device,
    check_shape,
    raise_on_flags,
    value_checks_enabled,
)
from .outputs import QAdapterLossOutput
from .qadapter_loss import check_loss_arguments, pair_outputs
from .residual_q_values import actions_in_range_flag

DEFAULT_TILE_BUDGET_MB = float(os.environ.get("QADAPTER_TILE_BUDGET_MB", 64))
_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32


@triton.jit
def _logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                  HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tiles of Q and L; each W tile is loaded once for both."""
    acc_q = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_l = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h_mask = row_ok[:, None] & k_ok[None, :]
        ha = tl.load(ha_ptr + rows[:, None] * H + ks[None, :], mask=h_mask, other=0.0)
        hb = tl.load(hb_ptr + rows[:, None] * H + ks[None, :], mask=h_mask, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly; on a GPU bf16 operands feed the tensor cores
            ha = ha.to(tl.float32)
            hb = hb.to(tl.float32)
            w = w.to(tl.float32)
        wt = tl.trans(w)
        acc_q = tl.dot(ha, wt, acc_q, input_precision=DOT_PRECISION)
        acc_l = tl.dot(hb, wt, acc_l, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc_q += b[None, :]
        acc_l += b[None, :]
    return acc_q, acc_l


@triton.jit
def _fused_linear_fwd_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, values_ptr, q_taken_ptr, lse_y_ptr,
    N, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    a = tl.load(actions_ptr + rows, mask=row_ok, other=-1)
    m_y = tl.full([BLOCK_M], -float("inf"), tl.float32)
    m_l = tl.full([BLOCK_M], -float("inf"), tl.float32)
    s_y = tl.zeros([BLOCK_M], dtype=tl.float32)
    s_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        q, l = _logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                             HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        q_a += tl.sum(tl.where(cols[None, :] == a[:, None], q, 0.0), 1)
        y = tl.where(col_ok[None, :], (q + alpha_0 * l) / alpha_tilde, -float("inf"))
        l = tl.where(col_ok[None, :], l, -float("inf"))
        m_y, s_y = online_lse_update(m_y, s_y, y, 1)
        m_l, s_l = online_lse_update(m_l, s_l, l, 1)
    lse_y = m_y + tl.log(s_y)
    tl.store(values_ptr + rows, alpha_tilde * lse_y - alpha_0 * (m_l + tl.log(s_l)), mask=row_ok)
    tl.store(q_taken_ptr + rows, q_a, mask=row_ok)
    tl.store(lse_y_ptr + rows, lse_y, mask=row_ok)


@triton.jit
def _fused_linear_dq_kernel(
    ha_ptr, hb_ptr, w_ptr, b_ptr, actions_ptr, lse_y_ptr, grad_values_ptr, grad_q_taken_ptr, out_ptr,
    row0, chunk_rows, H, V, alpha_tilde, alpha_0,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dQ = g_V * softmax(y) + g_q * onehot(a) for rows [row0, row0 + chunk_rows), all of V."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < chunk_rows
    rows = row0 + local
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    q, l = _logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                         HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    lse_y = tl.load(lse_y_ptr + rows, mask=row_ok, other=0.0)
    g_v = tl.load(grad_values_ptr + rows, mask=row_ok, other=0.0)
    g_q = tl.load(grad_q_taken_ptr + rows, mask=row_ok, other=0.0)
    a = tl.load(actions_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp((q + alpha_0 * l) / alpha_tilde - lse_y[:, None])
    dq = g_v[:, None] * p + tl.where(cols[None, :] == a[:, None], g_q[:, None], 0.0)
    out = out_ptr + local[:, None] * V + cols[None, :]
    tl.store(out, dq.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _kernel_options(ha: torch.Tensor, bias: torch.Tensor | None) -> dict:
    fp32_exact = ha.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    return dict(
        HAS_BIAS=bias is not None,
        UPCAST=TRITON_INTERPRETED or ha.dtype == torch.float64,
        DOT_PRECISION="ieee" if fp32_exact else "tf32",
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )


def _dq_chunks(ha, hb, w, bias, actions, lse_y, grad_values, grad_q_taken, alpha_tilde, alpha_0, chunk_rows):
    """Yields (row0, dQ [rows, V] in W's dtype) over row chunks, one reused buffer."""
    n, vocab = ha.shape[0], w.shape[0]
    buffer = torch.empty(min(chunk_rows, n) * vocab, dtype=w.dtype, device=w.device)
    for row0 in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - row0)
        dq = buffer[: rows * vocab].view(rows, vocab)
        _fused_linear_dq_kernel[(triton.cdiv(rows, _BLOCK_M), triton.cdiv(vocab, _BLOCK_N))](
            ha, hb, w, bias if bias is not None else w, actions, lse_y, grad_values, grad_q_taken, dq,
            row0, rows, ha.shape[1], vocab, alpha_tilde, alpha_0, **_kernel_options(ha, bias),
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
    _fused_linear_fwd_kernel[(triton.cdiv(n, _BLOCK_M),)](
        ha, hb, w, bias if bias is not None else w, actions, values, q_taken, lse_y,
        n, hidden, w.shape[0], alpha_tilde, alpha_0, **_kernel_options(ha, bias),
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
        grad_hidden = (grad_q_taken[:, None] * w[actions].to(acc) + grad_values[:, None] * expected).to(ha.dtype)
    if output_mask[1] or output_mask[2]:
        grad_w = torch.zeros_like(w) if output_mask[1] else None
        grad_b = torch.zeros(w.shape[0], dtype=acc, device=w.device) if output_mask[2] else None
        for row0, dq in _dq_chunks(ha, hb, w, bias, actions, lse_y.contiguous(), grad_values, grad_q_taken,
                                   alpha_tilde, alpha_0, tile_rows):
            if grad_w is not None:
                grad_w.addmm_(dq.t(), ha[row0 : row0 + dq.shape[0]])
            if grad_b is not None:
                grad_b += dq.sum(0, dtype=acc)
        grad_weight = grad_w if grad_w is not None else grad_weight
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


def plan_tiles(n: int, hidden: int, vocab: int, dtype: torch.dtype, streamed_on_cpu: bool,
               budget_mb: float) -> tuple[int, int]:
    """(tile_rows, tile_vocab) whose scratch buffers fit in budget_mb.

    C++ on CPU: two fp32 [rows x vocab] logits tiles (+ an fp32 copy of the W tile for
    bf16/fp16 weights), rows up to 2048. Triton: one [rows x V] dQ block in W's dtype.
    """
    budget = budget_mb * 2**20
    elem = torch.empty(0, dtype=dtype).element_size()
    if streamed_on_cpu:
        rows = max(1, min(n, 2048))
        acc_bytes = 8 if dtype == torch.float64 else 4
        per_col = 2 * rows * acc_bytes + (hidden * acc_bytes if elem != acc_bytes else 0)
        cols = int(budget // per_col)
        return rows, max(min(vocab, 64), min(vocab, cols - cols % 64 if cols >= 64 else cols))
    return max(1, min(n, int(budget // (vocab * elem)))), vocab


def check_hidden_and_head(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, layouts=None) -> None:
    """Float hidden states of one shape, an LM head [V, H] (+ bias [V]) matching them, one dtype and device.

    layouts(H) -> (allowed shapes of adapter_hidden, their description): the caller's layout,
    checked before H is compared with the head's, so a wrong H is reported against it.
    """
    for name, t in (("adapter_hidden", adapter_hidden), ("base_hidden", base_hidden),
                    ("lm_head_weight", lm_head_weight)):
        check_float_tensor(name, t)
    device = adapter_hidden.device
    check_same_device("adapter_hidden", device, base_hidden=base_hidden, lm_head_weight=lm_head_weight)
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[0] == 0:
        raise ValueError(f"lm_head_weight must be [V, H] with V >= 1, got {list(lm_head_weight.shape)}")
    hidden = lm_head_weight.shape[1]
    if layouts is not None:
        shapes, description = layouts(hidden)
        if tuple(adapter_hidden.shape) not in shapes:
            raise ValueError(f"adapter_hidden must be {description}, got {list(adapter_hidden.shape)}")
    if adapter_hidden.shape[-1] != hidden:
        raise ValueError(f"lm_head_weight must be [V, H] with H = {adapter_hidden.shape[-1]} (the last dimension "
                         f"of adapter_hidden), got {list(lm_head_weight.shape)}")
    check_shape("base_hidden", base_hidden, tuple(adapter_hidden.shape), "the shape of adapter_hidden")
    if lm_head_bias is not None:
        check_float_tensor("lm_head_bias", lm_head_bias)
        check_same_device("adapter_hidden", device, lm_head_bias=lm_head_bias)
        check_shape("lm_head_bias", lm_head_bias, (lm_head_weight.shape[0],), "[V] of lm_head_weight")
    for name, t in (("base_hidden", base_hidden), ("lm_head_weight", lm_head_weight), ("lm_head_bias", lm_head_bias)):
        if t is not None and t.dtype != adapter_hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from adapter_hidden dtype {adapter_hidden.dtype}")


def tile_budget(tile_budget_mb: object) -> float:
    """The scratch budget in MiB: the argument, else QADAPTER_TILE_BUDGET_MB, else 64."""
    budget = DEFAULT_TILE_BUDGET_MB if tile_budget_mb is None else tile_budget_mb
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise ValueError(f"tile_budget_mb must be a positive number, got {tile_budget_mb!r}")
    return float(budget)


def fused_linear_qadapter_loss(
    adapter_hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    gamma: float = 1.0,
    beta: float = 0.1,
    variant: str = "bellman",
    length_norm: bool = True,
    backend: str | None = None,
    tile_budget_mb: float | None = None,
) -> QAdapterLossOutput:
    """Q-Adapter loss straight from final hidden states and the shared, usually frozen, LM head.

    Same result as ``qadapter_loss(adapter_hidden @ W.T + b, base_hidden @ W.T + b, ...)``
    without ever holding an [N, V] logits tensor, in the forward or the backward.

    Args:
        adapter_hidden: ``[2B, T, H]`` (or ``[2B*T, H]``, rows in input_ids' order) final hidden
            states with the adapter on; receives a gradient.
        base_hidden: same shape, adapter off; never receives a gradient.
        lm_head_weight: ``[V, H]`` shared LM head, same dtype; gets a gradient only if it requires one.
        input_ids, loss_mask: ``[2B, T]``, chosen rows first (DESIGN.md §2).
        lm_head_bias: optional ``[V]`` bias.
        alpha_tilde, alpha_0, gamma, beta, variant, length_norm, backend: as in ``qadapter_loss``.
        tile_budget_mb: scratch memory the logits tiles may take (default 64 MiB, or the
            ``QADAPTER_TILE_BUDGET_MB`` environment variable). Larger tiles run bigger, faster
            matmuls; the budget bounds the extra memory, whatever V and N are.
    """
    check_index_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [2B, T], got {list(input_ids.shape)}")
    rows, T = input_ids.shape
    check_hidden_and_head(
        adapter_hidden, base_hidden, lm_head_weight, lm_head_bias,
        layouts=lambda h: ([(rows, T, h), (rows * T, h)],
                           f"[2B, T, H] = {[rows, T, h]} or [2B*T, H] = {[rows * T, h]} (H from lm_head_weight, "
                           f"2B and T from input_ids)"),
    )
    vocab, hidden = lm_head_weight.shape
    alpha_tilde, alpha_0, gamma, beta = check_loss_arguments(
        input_ids, loss_mask, alpha_tilde, alpha_0, gamma, beta, variant, length_norm, "input_ids", rows, T,
        adapter_hidden.device,
    )
    budget = tile_budget(tile_budget_mb)
    backend = resolve_backend(backend, adapter_hidden.device)
    check_values = value_checks_enabled(adapter_hidden.device)
    if check_values:
        raise_on_flags(actions_in_range_flag("input_ids", input_ids, vocab))
    actions = reference.next_token_actions(input_ids.long()).reshape(-1)
    ha, hb = adapter_hidden.reshape(rows * T, hidden), base_hidden.detach().reshape(rows * T, hidden)
    if backend == "torch":
        logits = lambda h: torch.nn.functional.linear(h, lm_head_weight, lm_head_bias)  # noqa: E731
        values, q_taken = reference.residual_q_values(logits(ha), logits(hb).detach(), actions, alpha_tilde, alpha_0)
    else:
        tile_rows, tile_vocab = plan_tiles(rows * T, hidden, vocab, lm_head_weight.dtype,
                                           backend == "cpu", budget)
        with_expected = torch.is_grad_enabled() and adapter_hidden.requires_grad
        args = (ha, hb, lm_head_weight, lm_head_bias, actions, alpha_tilde, alpha_0, tile_rows, tile_vocab,
                with_expected)
        if through_dispatcher(backend, adapter_hidden.device):
            values, q_taken, _, _ = torch.ops.qadapter.fused_linear_residual_q_values(*args)
        else:
            values, q_taken, _, _ = _InterpretedFusedLinear.apply(*args)
    return pair_outputs(values.view(rows, T), q_taken.view(rows, T), loss_mask.bool(), gamma, beta, variant,
                        length_norm, backend, check_values, "adapter_hidden, base_hidden or lm_head_weight")
