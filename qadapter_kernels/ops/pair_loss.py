"""Pair pass over [2B, T]: rewards, sequence scores, softplus Bradley-Terry and the regulariser.

Rows 0..B-1 are chosen responses, B..2B-1 rejected (docs/DESIGN.md §2). The action at position t
is x[t+1]; which actions are scored and which value bootstraps the reward depend on the variant:

    bellman:  scored iff loss_mask[t+1];  r_t = Q[a_t] - gamma * V[t+1] * loss_mask[t+2]
    official: scored iff loss_mask[t];    r_t = Q[a_t] - gamma * V[t]
    advantage: scored iff loss_mask[t+1]; r_t = Q[a_t] - gamma * V[t]

Reads top-down: Triton kernels -> launchers -> CUDA registration, fake kernels, autograd ->
the unchecked entry point.
The CPU kernels are C++ (csrc/pair_loss.cpp).
"""
import torch
import triton
import triton.language as tl

from ..params import LengthNorm, RewardVariant
from .backend import acc_dtype
from .triton_helpers import acc_constexpr
from .registration import KernelVariant, pointers, register_differentiable_op, register_triton_kernel, scalars


# The kernels take the variant and the length normalisation as integer constexprs (their .code).
_BELLMAN = tl.constexpr(RewardVariant.BELLMAN.code)
_OFFICIAL = tl.constexpr(RewardVariant.OFFICIAL.code)
_BY_RESPONSE = tl.constexpr(LengthNorm.RESPONSE.code)
_BY_PADDED_WIDTH = tl.constexpr(LengthNorm.PADDED.code)


@triton.jit
def _reward_layout(mask_row, t, T, VARIANT: tl.constexpr):
    """At positions t: whether r_t is scored, where the value bootstrapping it sits, whether it counts."""
    has_action = (t >= 0) & (t < T - 1)
    if VARIANT == _BELLMAN:
        scored = tl.load(mask_row + t + 1, mask=has_action, other=0) != 0
        counted = tl.load(mask_row + t + 2, mask=has_action & (t + 2 < T), other=0) != 0
        value_pos = t + 1
    else:  # official and advantage: the same state's value bootstraps the reward
        scored_at = t if VARIANT == _OFFICIAL else t + 1
        scored = tl.load(mask_row + scored_at, mask=has_action, other=0) != 0
        counted = has_action
        value_pos = t
    return scored, value_pos, counted


@triton.jit
def _inverse_norm(num_scored, T, LENGTH_NORM: tl.constexpr, ACC: tl.constexpr):
    """1 / what a row's summed reward is divided by: its scored actions (at least 1), T - 1, or 1."""
    if LENGTH_NORM == _BY_RESPONSE:
        inv = 1.0 / tl.maximum(num_scored, 1).to(ACC)
    elif LENGTH_NORM == _BY_PADDED_WIDTH:
        inv = 1.0 / (tl.zeros([], ACC) + (T - 1))
    else:
        inv = tl.full([], 1.0, ACC)
    return inv


@triton.jit
def _pair_rows_fwd_kernel(
    values_ptr, q_taken_ptr, mask_ptr, rewards_ptr, scores_ptr, sum_sq_ptr, count_ptr,
    T, gamma,
    VARIANT: tl.constexpr, LENGTH_NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rewards, score, sum of squared rewards and number of scored actions of one row."""
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    acc_r = tl.zeros([BLOCK_T], dtype=ACC)
    acc_sq = tl.zeros([BLOCK_T], dtype=ACC)
    acc_n = tl.zeros([BLOCK_T], dtype=tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        scored, value_pos, counted = _reward_layout(mask_ptr + base, t, T, VARIANT)
        value = tl.load(values_ptr + base + value_pos, mask=scored & counted, other=0.0).to(ACC)
        q_a = tl.load(q_taken_ptr + base + t, mask=scored, other=0.0).to(ACC)
        r = tl.where(scored, q_a - gamma * value, 0.0)
        tl.store(rewards_ptr + base + t, r, mask=t < T)
        acc_r += r
        acc_sq += r * r
        acc_n += scored.to(tl.int32)
    n = tl.sum(acc_n, 0)
    tl.store(scores_ptr + row, tl.sum(acc_r, 0) * _inverse_norm(n, T, LENGTH_NORM, ACC))
    tl.store(sum_sq_ptr + row, tl.sum(acc_sq, 0))
    tl.store(count_ptr + row, n.to(ACC))


@triton.jit
def _pair_reduce_kernel(
    scores_ptr, sum_sq_ptr, count_ptr, loss_ptr, pref_ptr, reg_ptr, accuracy_ptr, num_scored_ptr,
    B, beta,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pref = tl.zeros([BLOCK], dtype=ACC)
    correct = tl.zeros([BLOCK], dtype=ACC)
    sum_sq = tl.zeros([BLOCK], dtype=ACC)
    count = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, B, BLOCK):
        i = start + tl.arange(0, BLOCK)
        in_b = i < B
        chosen = tl.load(scores_ptr + i, mask=in_b, other=0.0)
        rejected = tl.load(scores_ptr + B + i, mask=in_b, other=0.0)
        margin = rejected - chosen
        softplus = tl.maximum(margin, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(margin)))
        pref += tl.where(in_b, softplus, 0.0)
        correct += tl.where(in_b & (chosen > rejected), 1.0, 0.0)
        for half in range(2):
            sum_sq += tl.load(sum_sq_ptr + half * B + i, mask=in_b, other=0.0)
            count += tl.load(count_ptr + half * B + i, mask=in_b, other=0.0)
    n = tl.sum(count, 0)
    pref_loss = tl.sum(pref, 0) / B
    reg_loss = beta * tl.sum(sum_sq, 0) / n
    tl.store(loss_ptr, pref_loss + reg_loss)
    tl.store(pref_ptr, pref_loss)
    tl.store(reg_ptr, reg_loss)
    tl.store(accuracy_ptr, tl.sum(correct, 0) / B)
    tl.store(num_scored_ptr, n)


@triton.jit
def _reward_grad(t, g_score_norm, g_sq, mask_row, rewards_row, grad_rewards_row, T, VARIANT: tl.constexpr):
    """d(outputs)/d(r_t) at positions t (0 where not scored), and whether r_t's bootstrap value counts."""
    scored, _, counted = _reward_layout(mask_row, t, T, VARIANT)
    r = tl.load(rewards_row + t, mask=scored, other=0.0)
    g_r = tl.load(grad_rewards_row + t, mask=scored, other=0.0)
    return tl.where(scored, g_score_norm + g_sq * r + g_r, 0.0), counted


@triton.jit
def _pair_bwd_kernel(
    grad_loss_ptr, grad_pref_ptr, grad_reg_ptr, grad_scores_ptr, grad_rewards_ptr,
    scores_ptr, rewards_ptr, num_scored_ptr, mask_ptr, grad_values_ptr, grad_q_taken_ptr,
    B, T, gamma, beta,
    VARIANT: tl.constexpr, LENGTH_NORM: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    g_loss = tl.load(grad_loss_ptr).to(ACC)
    chosen = row < B
    partner = tl.where(chosen, row + B, row - B)
    own = tl.load(scores_ptr + row).to(ACC)
    other = tl.load(scores_ptr + partner).to(ACC)
    # pref = mean softplus(S_rejected - S_chosen): +sigmoid on the rejected side, -sigmoid on the chosen.
    margin = tl.where(chosen, other - own, own - other)
    g_bt = (g_loss + tl.load(grad_pref_ptr).to(ACC)) / B
    g_score = tl.where(chosen, -g_bt, g_bt) * tl.sigmoid(margin) + tl.load(grad_scores_ptr + row).to(ACC)
    n = tl.zeros([BLOCK_T], dtype=tl.int32)
    if LENGTH_NORM == _BY_RESPONSE:
        for start in range(0, T, BLOCK_T):
            scored, _, _ = _reward_layout(mask_ptr + base, start + tl.arange(0, BLOCK_T), T, VARIANT)
            n += scored.to(tl.int32)
    g_score_norm = g_score * _inverse_norm(tl.sum(n, 0), T, LENGTH_NORM, ACC)
    g_sq = (g_loss + tl.load(grad_reg_ptr).to(ACC)) * 2.0 * beta / tl.load(num_scored_ptr).to(ACC)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        g_r, _ = _reward_grad(t, g_score_norm, g_sq, mask_ptr + base, rewards_ptr + base,
                              grad_rewards_ptr + base, T, VARIANT)
        tl.store(grad_q_taken_ptr + base + t, g_r, mask=t < T)
        # V[j] bootstraps r_{j-1} (bellman, while the response goes on) or r_j (official, advantage).
        if VARIANT == _BELLMAN:
            g_prev, counted = _reward_grad(t - 1, g_score_norm, g_sq, mask_ptr + base, rewards_ptr + base,
                                           grad_rewards_ptr + base, T, VARIANT)
            g_v = tl.where(counted, -gamma * g_prev, 0.0)
        else:
            g_v = -gamma * g_r
        tl.store(grad_values_ptr + base + t, g_v, mask=t < T)


def _block_t(T: int) -> int:
    return min(1024, triton.next_power_of_2(T))


def _mask_bytes(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask.contiguous().view(torch.uint8)


def _constexprs(variant: str, length_norm: str, T: int, dtype: torch.dtype) -> dict:
    return dict(VARIANT=RewardVariant(variant).code, LENGTH_NORM=LengthNorm(length_norm).code,
                ACC=acc_constexpr(dtype), BLOCK_T=_block_t(T))


def _triton_pair_loss(values, q_taken, loss_mask, gamma, beta, variant, length_norm):
    rows, T = values.shape
    values, q_taken = values.contiguous(), q_taken.contiguous()
    new = lambda *shape: values.new_empty(shape, dtype=acc_dtype(values.dtype))  # noqa: E731
    rewards, scores, sum_sq, count = new(rows, T), new(rows), new(rows), new(rows)
    loss, pref, reg, accuracy, num_scored = (new() for _ in range(5))
    _pair_rows_fwd_kernel[(rows,)](
        values, q_taken, _mask_bytes(loss_mask), rewards, scores, sum_sq, count, T, gamma,
        **_constexprs(variant, length_norm, T, values.dtype),
    )
    _pair_reduce_kernel[(1,)](
        scores, sum_sq, count, loss, pref, reg, accuracy, num_scored, rows // 2, beta,
        ACC=acc_constexpr(values.dtype), BLOCK=min(1024, triton.next_power_of_2(rows // 2)),
    )
    return loss, pref, reg, scores, accuracy, rewards, num_scored


def _triton_pair_loss_backward(
    grad_loss, grad_pref_loss, grad_reg_loss, grad_scores, grad_rewards, scores, rewards, num_scored,
    loss_mask, gamma, beta, variant, length_norm,
):
    rows, T = rewards.shape
    grad_values, grad_q_taken = torch.empty_like(rewards), torch.empty_like(rewards)
    c = lambda t: t.contiguous()  # noqa: E731
    _pair_bwd_kernel[(rows,)](
        c(grad_loss), c(grad_pref_loss), c(grad_reg_loss), c(grad_scores), c(grad_rewards),
        c(scores), c(rewards), c(num_scored), _mask_bytes(loss_mask), grad_values, grad_q_taken,
        rows // 2, T, gamma, beta, **_constexprs(variant, length_norm, T, rewards.dtype),
    )
    return grad_values, grad_q_taken


@torch.library.register_fake("qadapter::pair_loss")
def _pair_loss_fake(values, q_taken, loss_mask, gamma, beta, variant, length_norm):
    rows, T = values.shape
    new = lambda *shape: values.new_empty(shape, dtype=acc_dtype(values.dtype))  # noqa: E731
    return new(), new(), new(), new(rows), new(), new(rows, T), new()


@torch.library.register_fake("qadapter::pair_loss_backward")
def _pair_loss_backward_fake(
    grad_loss, grad_pref_loss, grad_reg_loss, grad_scores, grad_rewards, scores, rewards, num_scored,
    loss_mask, gamma, beta, variant, length_norm,
):
    return torch.empty_like(rewards), torch.empty_like(rewards)


def _setup_context(ctx, inputs, output):
    _, _, loss_mask, gamma, beta, variant, length_norm = inputs
    _, _, _, scores, _, rewards, num_scored = output
    # Detached: the backward ops have no derivative of their own (no double backward).
    ctx.save_for_backward(scores.detach(), rewards.detach(), num_scored, loss_mask)
    ctx.params = (gamma, beta, variant, length_norm)


def _make_backward(backward_kernel):
    """Autograd backward over a backward kernel (the dispatcher op or the Triton launcher)."""

    def backward(ctx, grad_loss, grad_pref, grad_reg, grad_scores, _grad_accuracy, grad_rewards, _grad_num):
        scores, rewards, num_scored, loss_mask = ctx.saved_tensors
        fill = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        grad_values, grad_q_taken = backward_kernel(
            fill(grad_loss, num_scored), fill(grad_pref, num_scored), fill(grad_reg, num_scored),
            fill(grad_scores, scores), fill(grad_rewards, rewards), scores, rewards, num_scored, loss_mask,
            *ctx.params,
        )
        return grad_values, grad_q_taken, None, None, None, None, None

    return backward


_InterpretedPairLoss = register_differentiable_op(
    "pair_loss", _triton_pair_loss, _triton_pair_loss_backward, _setup_context, _make_backward
)


def pair_loss_rows(values, q_taken, loss_mask, gamma, beta, variant, length_norm, via_dispatcher: bool):
    """The fused pair pass on [2B, T] tensors; returns the op's seven outputs. No argument checks."""
    if via_dispatcher:
        return torch.ops.qadapter.pair_loss(values, q_taken, loss_mask, gamma, beta, variant, length_norm)
    return _InterpretedPairLoss.apply(values, q_taken, loss_mask, gamma, beta, variant, length_norm)


def _register_compile_variants() -> None:
    per_row = ["values_ptr", "q_taken_ptr", "rewards_ptr", "scores_ptr", "sum_sq_ptr", "count_ptr"]
    grads = ["grad_loss_ptr", "grad_pref_ptr", "grad_reg_ptr", "grad_scores_ptr", "grad_rewards_ptr", "scores_ptr",
             "rewards_ptr", "num_scored_ptr", "grad_values_ptr", "grad_q_taken_ptr"]
    reduced = ["scores_ptr", "sum_sq_ptr", "count_ptr", "loss_ptr", "pref_ptr", "reg_ptr", "accuracy_ptr",
               "num_scored_ptr"]
    forward, backward, reduce = [], [], []
    for acc, acc_type in (("fp32", tl.float32), ("fp64", tl.float64)):
        reduce.append(KernelVariant({**pointers(reduced, acc), "B": "i32", "beta": "fp32"},
                                    {"ACC": acc_type, "BLOCK": 1024}))
        for variant in RewardVariant:
            for length_norm in LengthNorm:
                constexprs = {"VARIANT": variant.code, "LENGTH_NORM": length_norm.code, "ACC": acc_type,
                              "BLOCK_T": 1024}
                forward.append(KernelVariant({**pointers(per_row, acc), "mask_ptr": "*u8", "T": "i32",
                                              "gamma": "fp32"}, constexprs))
                backward.append(KernelVariant({**pointers(grads, acc), "mask_ptr": "*u8", **scalars("i32", "B", "T"),
                                               **scalars("fp32", "gamma", "beta")}, constexprs))
    register_triton_kernel(_pair_rows_fwd_kernel, forward)
    register_triton_kernel(_pair_bwd_kernel, backward)
    register_triton_kernel(_pair_reduce_kernel, reduce)


_register_compile_variants()
