"""The public Q-Adapter losses with their argument checks: from [2B, T, V] logits, or from hidden
states and the LM head (the [N, V] logits never exist); a vocabulary pass, then the pair pass.

Each call costs at most one host sync: every check that reads tensor values is gathered into
one flag set and read once, after the kernels (which never read out of bounds on bad values).
"""
import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.fused_linear import fused_linear_rows
from ..ops.pair_loss import pair_loss_rows
from ..ops.triton_helpers import plan_tiles
from ..outputs import QAdapterLossOutput
from ..params import QAdapterParams, resolve, with_param_keywords
from .checks import (
    check_hidden_and_head,
    check_index_tensor,
    check_logits_pair,
    check_mask_tensor,
    check_float_tensor,
    check_same_device,
    check_shape,
    finite_values_flag,
    guard_actions,
    ids_in_range_flag,
    raise_on_flags,
    tile_budget,
    value_checks_enabled,
)
from .q_values import q_values_rows

EMPTY_MASK_MESSAGE = "loss_mask scores no token in the whole batch"


def check_pair_batch(input_ids, loss_mask, rows_name: str, rows: int, T: int, device: torch.device) -> None:
    """input_ids and loss_mask: integer / bool [2B, T] tensors on ``device``, 2B > 0 rows, T >= 2."""
    check_index_tensor("input_ids", input_ids)
    check_mask_tensor("loss_mask", loss_mask)
    check_same_device(rows_name, device, input_ids=input_ids, loss_mask=loss_mask)
    if rows % 2 or rows == 0:
        raise ValueError(f"{rows_name} must hold 2B rows (B chosen, then B rejected), got {rows} rows")
    if T < 2:
        raise ValueError(f"sequences need T >= 2 tokens (a state and a next token), got T = {T}")
    check_shape("input_ids", input_ids, (rows, T), f"the [2B, T] of {rows_name}")
    check_shape("loss_mask", loss_mask, (rows, T), f"the [2B, T] of {rows_name}")


def next_token_actions(input_ids, vocab: int, flags: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, T] actions (ids outside [0, vocab) replaced by ids inside) and where they were out of
    range; the range check of every id in input_ids joins ``flags``."""
    if flags is not None:
        flags.update(ids_in_range_flag("input_ids", input_ids, vocab))
    return guard_actions(reference.next_token_actions(input_ids.long()), vocab)


def pair_pass(values, q_taken, loss_mask, params: QAdapterParams, backend: str) -> tuple[QAdapterLossOutput, torch.Tensor]:
    """The pair pass on [2B, T] values and picked Q on a resolved backend, and its scored-token count; no checks."""
    if backend == "torch":
        out = reference.pair_loss(values, q_taken, loss_mask, params)
        return out, reference.scored_positions(loss_mask, params.variant).sum()
    loss, pref, reg, scores, accuracy, _, num_scored = pair_loss_rows(
        values, q_taken, loss_mask, params.gamma, params.beta, params.variant.value, params.length_norm.value,
        through_dispatcher(backend, values.device))
    B = values.shape[0] // 2
    return QAdapterLossOutput(loss, pref, reg, scores[:B], scores[B:], accuracy.detach()), num_scored


def checked_pair_outputs(values, q_taken, loss_mask, params: QAdapterParams, backend: str, flags: dict | None,
                         source: str) -> QAdapterLossOutput:
    """The pair pass, then every value check of the call (``flags`` so far, None when off) in one host sync."""
    out, num_scored = pair_pass(values, q_taken, loss_mask, params, backend)
    if flags is not None:
        # Ordered by cause: bad ids, non-finite logits or an empty mask also make the loss non-finite.
        flags.update(finite_values_flag(values, source, params.alpha_0))
        flags[EMPTY_MASK_MESSAGE] = num_scored == 0
        flags["the loss is not finite: an action at a scored position has a -inf q_logit"] = ~torch.isfinite(out.loss)
        raise_on_flags(flags)
    return out


@with_param_keywords(QAdapterParams)
def qadapter_loss(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    params: QAdapterParams | None = None,
    *,
    backend: str | None = None,
    **overrides,
) -> QAdapterLossOutput:
    """Fused Q-Adapter loss over B preference pairs (docs/DESIGN.md §2).

    Args:
        q_logits: ``[2B, T, V]`` adapter logits (rows 0..B-1 chosen, B..2B-1 rejected); fp32,
            bf16, fp16 or fp64. The only input that receives a gradient.
        base_logits: ``[2B, T, V]`` frozen base-model logits, same dtype.
        input_ids: ``[2B, T]`` token ids; the action at position t is ``input_ids[:, t + 1]``.
        loss_mask: ``[2B, T]`` bool, True at response tokens (not prompt, not padding).
        params: a ``QAdapterParams`` (None: the defaults); keyword arguments named after its
            fields (``alpha_tilde``, ``alpha_0``, ``gamma``, ``beta``, ``variant``, ``length_norm``)
            override it.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (the reference).

    Returns:
        A ``QAdapterLossOutput``. Never builds an fp32 ``[2B, T, V]`` temporary: the
        forward streams the vocabulary once and the backward writes dQ directly. One host sync
        (the value checks), none under torch.compile or CUDA-graph capture.
    """
    check_logits_pair(q_logits, base_logits)
    if q_logits.dim() != 3:
        raise ValueError(f"q_logits must be [2B, T, V], got {list(q_logits.shape)}")
    rows, T, vocab = q_logits.shape
    check_pair_batch(input_ids, loss_mask, "q_logits", rows, T, q_logits.device)
    p = resolve(QAdapterParams, params, overrides)
    backend = resolve_backend(backend, q_logits.device)
    flags = {} if value_checks_enabled(q_logits.device) else None
    actions, bad_actions = next_token_actions(input_ids, vocab, flags)
    values, q_taken = q_values_rows(
        q_logits.reshape(rows * T, vocab), base_logits.detach().reshape(rows * T, vocab), actions.reshape(-1),
        p.alpha_tilde, p.alpha_0, backend,
    )
    q_taken = torch.where(bad_actions.reshape(-1), float("nan"), q_taken)
    return checked_pair_outputs(values.view(rows, T), q_taken.view(rows, T), loss_mask.bool(), p, backend, flags,
                                "q_logits or base_logits")


def fused_linear_values(ha, hb, lm_head_weight, lm_head_bias, actions, params, backend: str, budget_mb: float,
                        base_lse: torch.Tensor | None = None):
    """(values, q_taken), each [N], from [N, H] hidden states and the LM head on a resolved backend; no checks.
    ``base_lse``: [N] LSE of the base logits from a cached base pass (then one head product per tile)."""
    if backend == "torch":
        logits = lambda h: torch.nn.functional.linear(h, lm_head_weight, lm_head_bias)  # noqa: E731
        return reference.residual_q_values(logits(ha), logits(hb).detach(), actions, params, base_lse=base_lse)
    vocab, hidden = lm_head_weight.shape
    tile_rows, tile_vocab = plan_tiles(ha.shape[0], hidden, vocab, lm_head_weight.dtype, backend == "cpu", budget_mb)
    with_expected = torch.is_grad_enabled() and ha.requires_grad
    return fused_linear_rows(ha, hb, lm_head_weight, lm_head_bias, actions, params.alpha_tilde, params.alpha_0,
                             tile_rows, tile_vocab, with_expected, through_dispatcher(backend, ha.device), base_lse)


@with_param_keywords(QAdapterParams)
def fused_linear_qadapter_loss(
    adapter_hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    params: QAdapterParams | None = None,
    *,
    backend: str | None = None,
    tile_budget_mb: float | None = None,
    base_lse: torch.Tensor | None = None,
    **overrides,
) -> QAdapterLossOutput:
    """Q-Adapter loss straight from final hidden states and the shared, usually frozen, LM head.

    Same result as ``qadapter_loss(adapter_hidden @ W.T + b, base_hidden @ W.T + b, ...)``
    without ever holding an [N, V] logits tensor, in the forward or the backward.

    Args:
        adapter_hidden: ``[2B, T, H]`` (or ``[2B*T, H]``, rows in input_ids' order) final hidden
            states with the adapter on; receives a gradient.
        base_hidden: same shape, adapter off; never receives a gradient.
        lm_head_weight: ``[V, H]`` shared LM head, same dtype; gets a gradient only if it requires one.
        input_ids: ``[2B, T]`` token ids, chosen rows first (docs/DESIGN.md §2).
        loss_mask: ``[2B, T]`` bool, True at response tokens.
        lm_head_bias: optional ``[V]`` bias.
        params: as in ``qadapter_loss``, and so are the keywords that override its fields.
        backend: as in ``qadapter_loss``.
        tile_budget_mb: scratch memory the logits tiles may take (default 64 MiB, or the
            ``QADAPTER_TILE_BUDGET_MB`` environment variable, read at each call). Larger tiles run
            bigger, faster matmuls; the budget bounds the extra memory, whatever V and N are.
        base_lse: ``[2B, T]`` (or ``[2B*T]``) float ``LSE(base_hidden @ W.T + b)`` per position, as a
            cached base pass recorded it (``training.base_cache``). With it the base logits are never
            formed: each W tile needs one head product, on ``h_c = (adapter_hidden + alpha_0 *
            base_hidden) / alpha_tilde`` (docs/DESIGN.md §1), instead of two. Never receives a gradient.
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
    check_pair_batch(input_ids, loss_mask, "input_ids", rows, T, adapter_hidden.device)
    if base_lse is not None:
        check_float_tensor("base_lse", base_lse)
        check_same_device("adapter_hidden", adapter_hidden.device, base_lse=base_lse)
        if tuple(base_lse.shape) not in ((rows, T), (rows * T,)):
            raise ValueError(f"base_lse must be [2B, T] = {[rows, T]} or [2B*T] = {[rows * T]} (from input_ids), "
                             f"got {list(base_lse.shape)}")
    p = resolve(QAdapterParams, params, overrides)
    budget = tile_budget(tile_budget_mb)
    backend = resolve_backend(backend, adapter_hidden.device)
    flags = {} if value_checks_enabled(adapter_hidden.device) else None
    actions, bad_actions = next_token_actions(input_ids, vocab, flags)
    ha, hb = adapter_hidden.reshape(rows * T, hidden), base_hidden.detach().reshape(rows * T, hidden)
    if base_lse is not None:
        base_lse = base_lse.detach().reshape(rows * T)
        if flags is not None:
            flags["base_lse holds NaN or +-inf"] = ~torch.isfinite(base_lse).all()
    values, q_taken = fused_linear_values(ha, hb, lm_head_weight, lm_head_bias, actions.reshape(-1), p, backend,
                                          budget, base_lse)
    q_taken = torch.where(bad_actions.reshape(-1), float("nan"), q_taken)
    return checked_pair_outputs(values.view(rows, T), q_taken.view(rows, T), loss_mask.bool(), p, backend, flags,
                                "adapter_hidden, base_hidden or lm_head_weight")
