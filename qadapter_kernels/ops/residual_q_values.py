"""Per-position vocabulary pass: soft value V(s) and picked Q(s, a) from adapter and base logits.

    y      = (Q + alpha_0 * L) / alpha_tilde
    V      = alpha_tilde * LSE(y) - alpha_0 * LSE(L)
    q_a    = Q[a]
    dQ     = g_q * onehot(a) + g_V * softmax(y)

Reads top-down: Triton kernels -> launchers -> CUDA registration, fake kernels, autograd ->
the unchecked entry point. The CPU kernels are C++ (csrc/residual_q_values.cpp).
"""
import torch
import triton
import triton.language as tl

from .backend import acc_dtype
from .registration import (
    FLOAT_TYPES,
    KernelVariant,
    pointers,
    register_differentiable_op,
    register_triton_kernel,
    scalars,
)
from .triton_helpers import acc_constexpr, online_lse_update, row_contiguous

_BLOCK_V = 4096


@triton.jit
def _residual_q_values_fwd_kernel(
    q_ptr, l_ptr, actions_ptr, values_ptr, q_taken_ptr, lse_y_ptr,
    q_stride, l_stride, V, alpha_tilde, alpha_0,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    q_row = q_ptr + row * q_stride
    l_row = l_ptr + row * l_stride
    inv_at = 1.0 / (tl.zeros([], ACC) + alpha_tilde)
    m_y = tl.full([], -float("inf"), ACC)
    s_y = tl.zeros([], ACC)
    m_l = tl.full([], -float("inf"), ACC)
    s_l = tl.zeros([], ACC)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        # ACC right after the load: the reductions run in fp32 (fp64 for fp64) whatever the input dtype.
        q = tl.load(q_row + offs, mask=in_v, other=0.0).to(ACC)
        l = tl.load(l_row + offs, mask=in_v, other=0.0).to(ACC)
        y = tl.where(in_v, (q + alpha_0 * l) * inv_at, -float("inf"))
        l = tl.where(in_v, l, -float("inf"))
        m_y, s_y = online_lse_update(m_y, s_y, y, 0)
        m_l, s_l = online_lse_update(m_l, s_l, l, 0)
    lse_y = m_y + tl.log(s_y)
    lse_l = m_l + tl.log(s_l)
    a = tl.load(actions_ptr + row)
    # An out-of-range action reads nothing and yields NaN (the eager entry point reports it).
    valid = (a >= 0) & (a < V)
    q_a = tl.load(q_row + a, mask=valid, other=float("nan")).to(ACC)
    tl.store(values_ptr + row, alpha_tilde * lse_y - alpha_0 * lse_l)
    tl.store(q_taken_ptr + row, q_a)
    tl.store(lse_y_ptr + row, lse_y)


@triton.jit
def _residual_q_values_bwd_kernel(
    grad_values_ptr, grad_q_taken_ptr, q_ptr, l_ptr, actions_ptr, lse_y_ptr, grad_q_ptr,
    q_stride, l_stride, V, alpha_tilde, alpha_0,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_v = offs < V
    out = grad_q_ptr + row * V + offs
    g_v = tl.load(grad_values_ptr + row)
    g_q = tl.load(grad_q_taken_ptr + row)
    if (g_v == 0.0) & (g_q == 0.0):
        # Prompt and pad positions: zeros, without reading the logits.
        tl.store(out, tl.zeros([BLOCK_V], dtype=grad_q_ptr.dtype.element_ty), mask=in_v)
    else:
        q = tl.load(q_ptr + row * q_stride + offs, mask=in_v, other=0.0).to(ACC)
        l = tl.load(l_ptr + row * l_stride + offs, mask=in_v, other=0.0).to(ACC)
        lse_y = tl.load(lse_y_ptr + row)
        pi = tl.exp((q + alpha_0 * l) / alpha_tilde - lse_y)
        a = tl.load(actions_ptr + row)
        grad = g_v * pi + tl.where(offs == a, g_q, 0.0)
        tl.store(out, grad.to(grad_q_ptr.dtype.element_ty), mask=in_v)


def _triton_fwd(q_logits, base_logits, actions, alpha_tilde, alpha_0):
    q, l = row_contiguous(q_logits), row_contiguous(base_logits)
    n, vocab = q.shape
    out = [torch.empty(n, dtype=acc_dtype(q.dtype), device=q.device) for _ in range(3)]
    if n:
        _residual_q_values_fwd_kernel[(n,)](
            q, l, actions.contiguous(), *out, q.stride(0), l.stride(0), vocab, alpha_tilde, alpha_0,
            ACC=acc_constexpr(q.dtype), BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8,
        )
    return tuple(out)


def _triton_bwd(grad_values, grad_q_taken, q_logits, base_logits, actions, lse_y, alpha_tilde, alpha_0):
    q, l = row_contiguous(q_logits), row_contiguous(base_logits)
    n, vocab = q.shape
    grad_q = torch.empty((n, vocab), dtype=q.dtype, device=q.device)
    block = min(_BLOCK_V, triton.next_power_of_2(vocab))
    if n:
        acc = acc_dtype(q.dtype)
        _residual_q_values_bwd_kernel[(n, triton.cdiv(vocab, block))](
            grad_values.to(acc).contiguous(), grad_q_taken.to(acc).contiguous(), q, l,
            actions.contiguous(), lse_y.contiguous(), grad_q, q.stride(0), l.stride(0), vocab,
            alpha_tilde, alpha_0, ACC=acc_constexpr(q.dtype), BLOCK_V=block, num_warps=8,
        )
    return grad_q


@torch.library.register_fake("qadapter::residual_q_values")
def _residual_q_values_fake(q_logits, base_logits, actions, alpha_tilde, alpha_0):
    n = q_logits.shape[0]
    return tuple(q_logits.new_empty(n, dtype=acc_dtype(q_logits.dtype)) for _ in range(3))


@torch.library.register_fake("qadapter::residual_q_values_backward")
def _residual_q_values_backward_fake(
    grad_values, grad_q_taken, q_logits, base_logits, actions, lse_y, alpha_tilde, alpha_0
):
    return torch.empty_like(q_logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q_logits, base_logits, actions, alpha_tilde, alpha_0 = inputs
    ctx.save_for_backward(q_logits, base_logits, actions, output[2])
    ctx.alpha_tilde, ctx.alpha_0 = alpha_tilde, alpha_0


def _make_backward(backward_kernel):
    """Autograd backward over a backward kernel (the dispatcher op or the Triton launcher)."""

    def backward(ctx, grad_values, grad_q_taken, grad_lse_y):
        q_logits, base_logits, actions, lse_y = ctx.saved_tensors
        zeros = lse_y.new_zeros(lse_y.shape)
        grad_values = zeros if grad_values is None else grad_values
        grad_q_taken = zeros if grad_q_taken is None else grad_q_taken
        if grad_lse_y is not None:
            # d LSE(y) / dQ = softmax(y) / alpha_tilde: it joins the value gradient.
            grad_values = grad_values + grad_lse_y / ctx.alpha_tilde
        grad_q = backward_kernel(
            grad_values, grad_q_taken, q_logits, base_logits, actions, lse_y, ctx.alpha_tilde, ctx.alpha_0
        )
        # The base model is frozen: base_logits never receives a gradient.
        return grad_q, None, None, None, None

    return backward


_InterpretedResidualQValues = register_differentiable_op(
    "residual_q_values", _triton_fwd, _triton_bwd, _setup_context, _make_backward
)


def residual_q_values_rows(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    actions: torch.Tensor,
    alpha_tilde: float,
    alpha_0: float,
    via_dispatcher: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] logits and int64 [N] actions -> (values, q_taken), each [N]; no argument checks."""
    if via_dispatcher:
        values, q_taken, _ = torch.ops.qadapter.residual_q_values(q_logits, base_logits, actions, alpha_tilde, alpha_0)
    else:
        values, q_taken, _ = _InterpretedResidualQValues.apply(q_logits, base_logits, actions, alpha_tilde, alpha_0)
    return values, q_taken


_ACC = {"fp32": tl.float32, "fp64": tl.float64}


def _compile_variants() -> tuple[list[KernelVariant], list[KernelVariant]]:
    forward, backward = [], []
    for dt in FLOAT_TYPES:
        acc = "fp64" if dt == "fp64" else "fp32"
        common = {"actions_ptr": "*i64", **scalars("i32", "q_stride", "l_stride", "V"),
                  **scalars("fp32", "alpha_tilde", "alpha_0")}
        forward.append(KernelVariant(
            {**pointers(["q_ptr", "l_ptr"], dt), **pointers(["values_ptr", "q_taken_ptr", "lse_y_ptr"], acc), **common},
            {"ACC": _ACC[acc], "BLOCK_V": _BLOCK_V}))
        backward.append(KernelVariant(
            {**pointers(["grad_values_ptr", "grad_q_taken_ptr", "lse_y_ptr"], acc),
             **pointers(["q_ptr", "l_ptr", "grad_q_ptr"], dt), **common},
            {"ACC": _ACC[acc], "BLOCK_V": _BLOCK_V}))
    return forward, backward


_FORWARD_VARIANTS, _BACKWARD_VARIANTS = _compile_variants()
register_triton_kernel(_residual_q_values_fwd_kernel, _FORWARD_VARIANTS)
register_triton_kernel(_residual_q_values_bwd_kernel, _BACKWARD_VARIANTS)
