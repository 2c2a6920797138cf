"""The public Q-Adapter losses with their argument checks: from [2B, T, V] logits, or from hidden
states and the LM head (the [N, V] logits never exist); a vocabulary pass, then the pair pass."""
import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.fused_linear import fused_linear_rows
from ..ops.pair_loss import pair_loss_rows
from ..ops.triton_helpers import plan_tiles
from ..outputs import QAdapterLossOutput
from ..params import RewardVariant, check_scalar
from .checks import (
    actions_in_range_flag,
    check_alphas,
    check_hidden_and_head,
    check_index_tensor,
    check_logits_pair,
    check_mask_tensor,
    check_same_device,
    check_shape,
    finite_values_flag,
    raise_on_flags,
    tile_budget,
    value_checks_enabled,
)
from .q_values import q_values_rows


def check_loss_arguments(
    input_ids, loss_mask, alpha_tilde, alpha_0, gamma, beta, variant, length_norm, rows_name, rows, T, device
) -> tuple[float, float, float, float]:
    """Checks shared by the loss entry points; returns the hyper-parameters as floats."""
    check_index_tensor("input_ids", input_ids)
    check_mask_tensor("loss_mask", loss_mask)
    check_same_device(rows_name, device, input_ids=input_ids, loss_mask=loss_mask)
    if rows % 2 or rows == 0:
        raise ValueError(
            f"{rows_name} must hold 2B rows (B chosen, then B rejected), got {rows} rows"
        )
    if T < 2:
        raise ValueError(f"sequences need T >= 2 tokens (a state and a next token), got T = {T}")
    check_shape("input_ids", input_ids, (rows, T), f"the [2B, T] of {rows_name}")
    check_shape("loss_mask", loss_mask, (rows, T), f"the [2B, T] of {rows_name}")
    variant = RewardVariant.parse(variant).value
    if not isinstance(length_norm, bool):
        raise TypeError(f"length_norm must be a bool, got {type(length_norm).__name__}")
    return (
        *check_alphas(alpha_tilde, alpha_0),
        check_scalar("gamma", gamma, 0.0, 1.0),
        check_scalar("beta", beta, 0.0, float("inf")),
    )


def pair_outputs(values, q_taken, loss_mask, gamma, beta, variant, length_norm, backend, check_values,
                 source: str = "q_logits or base_logits") -> QAdapterLossOutput:
    """Pair pass on [2B, T] values and picked Q, then the eager value checks in one host sync."""
    if backend == "torch":
        out = reference.pair_loss(values, q_taken, loss_mask, gamma, beta, variant, length_norm)
        nothing_scored = None  # the reference raises on an empty mask itself
    else:
        loss, pref, reg, scores, accuracy, _, num_scored = pair_loss_rows(
            values, q_taken, loss_mask, gamma, beta, variant, length_norm, through_dispatcher(backend, values.device)
        )
        B = values.shape[0] // 2
        out = QAdapterLossOutput(loss, pref, reg, scores[:B], scores[B:], accuracy.detach())
        nothing_scored = num_scored == 0
    if check_values:
        # Ordered by cause: non-finite logits or an empty mask also make the loss non-finite.
        flags = finite_values_flag(values, source)
        if nothing_scored is not None:
            flags["loss_mask scores no token in the whole batch"] = nothing_scored
        flags["the loss is not finite: an action at a scored position has a -inf q_logit"] = ~torch.isfinite(out.loss)
        raise_on_flags(flags)
    return out


def qadapter_loss(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    gamma: float = 1.0,
    beta: float = 0.1,
    variant: str = "bellman",
    length_norm: bool = True,
    backend: str | None = None,
) -> QAdapterLossOutput:
    """Fused Q-Adapter loss over B preference pairs (DESIGN.md §2).

    Args:
        q_logits: ``[2B, T, V]`` adapter logits (rows 0..B-1 chosen, B..2B-1 rejected); fp32,
            bf16, fp16 or fp64. The only input that receives a gradient.
        base_logits: ``[2B, T, V]`` frozen base-model logits, same dtype.
        input_ids: ``[2B, T]`` token ids; the action at position t is ``input_ids[:, t + 1]``.
        loss_mask: ``[2B, T]`` bool, True at response tokens (not prompt, not padding).
        alpha_tilde, alpha_0, gamma, beta: Q-Adapter hyper-parameters (DESIGN.md §1).
        variant: ``"bellman"`` (the theory) or ``"official"`` (bit-compatible with the authors).
        length_norm: divide sequence scores by ``T - 1`` as the authors do.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (the reference).

    Returns:
        A :class:`QAdapterLossOutput`. Never builds an fp32 ``[2B, T, V]`` temporary: the
        forward streams the vocabulary once and the backward writes dQ directly.
    """
    check_logits_pair(q_logits, base_logits)
    if q_logits.dim() != 3:
        raise ValueError(f"q_logits must be [2B, T, V], got {list(q_logits.shape)}")
    rows, T, vocab = q_logits.shape
    alpha_tilde, alpha_0, gamma, beta = check_loss_arguments(
        input_ids, loss_mask, alpha_tilde, alpha_0, gamma, beta, variant, length_norm, "q_logits", rows, T,
        q_logits.device,
    )
    backend = resolve_backend(backend, q_logits.device)
    check_values = value_checks_enabled(q_logits.device)
    actions = reference.next_token_actions(input_ids.long())
    loss_mask = loss_mask.bool()
    if check_values:
        raise_on_flags(actions_in_range_flag("input_ids", input_ids, vocab))
    values, q_taken = q_values_rows(
        q_logits.reshape(rows * T, vocab), base_logits.detach().reshape(rows * T, vocab),
        actions.reshape(-1), alpha_tilde, alpha_0, backend,
    )
    return pair_outputs(values.view(rows, T), q_taken.view(rows, T), loss_mask, gamma, beta, variant,
                        length_norm, backend, check_values)


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
        values, q_taken = fused_linear_rows(ha, hb, lm_head_weight, lm_head_bias, actions, alpha_tilde, alpha_0,
                                            tile_rows, tile_vocab, with_expected,
                                            through_dispatcher(backend, adapter_hidden.device))
    return pair_outputs(values.view(rows, T), q_taken.view(rows, T), loss_mask.bool(), gamma, beta, variant,
                        length_norm, backend, check_values, "adapter_hidden, base_hidden or lm_head_weight")
