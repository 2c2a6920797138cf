"""The public log-probability function with its argument checks: log pi~(token) of the customised
policy from hidden states and the shared LM head, without building a [N, V] logits row."""
import torch
import torch.nn.functional as F

from .. import reference
from ..ops.backend import acc_dtype, resolve_backend, through_dispatcher
from ..ops.log_probs import log_probs_from_hidden_rows
from ..ops.triton_helpers import plan_tiles
from ..params import PolicyParams, resolve, with_param_keywords
from .checks import (
    check_hidden_and_head,
    check_index_tensor,
    check_same_device,
    raise_on_flags,
    tile_budget,
    value_checks_enabled,
)


def log_probs_hidden_rows(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, tokens, policy: PolicyParams,
                          backend: str, budget_mb: float) -> torch.Tensor:
    """log pi~(tokens) of [N, H] hidden states and int64 tokens [N] on a resolved backend; NaN for an id
    outside [0, V). No checks, no host sync (``generate``'s per-token log-probs)."""
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    ha, hb, w, b = map(detach, (adapter_hidden, base_hidden, lm_head_weight, lm_head_bias))
    if backend == "torch":
        acc = acc_dtype(ha.dtype)
        logits = lambda h: F.linear(h.to(acc), w.to(acc), None if b is None else b.to(acc))  # noqa: E731
        vocab = w.shape[0]
        valid = (tokens >= 0) & (tokens < vocab)
        picked = reference.combined_log_probs(logits(ha), logits(hb), torch.where(valid, tokens, 0), policy)
        return torch.where(valid, picked, float("nan"))
    rows, hidden = ha.shape
    tile_rows, tile_vocab = plan_tiles(rows, hidden, w.shape[0], w.dtype, True, budget_mb)
    return log_probs_from_hidden_rows(ha, hb, w, b, tokens, policy.alpha_tilde, policy.alpha_0, tile_rows, tile_vocab,
                                      through_dispatcher(backend, ha.device))


@with_param_keywords(PolicyParams)
def combined_log_probs_from_hidden(
    adapter_hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    params: PolicyParams | None = None,
    *,
    backend: str | None = None,
    tile_budget_mb: float | None = None,
    **overrides,
) -> torch.Tensor:
    """log pi~(tokens) of the customised policy ``softmax((Q + alpha_0 * log_softmax(L)) / alpha_tilde)``.

    Computed as ``log_softmax(W h_c + b')[token]`` with ``h_c = (h_q + alpha_0 h_b) / alpha_tilde``
    (docs/DESIGN.md §1 (the logit identity)): one head product per tile, a running logsumexp, no [N, V] row stored.

    Args:
        adapter_hidden: final hidden states ``[..., H]`` with the adapter on.
        base_hidden: final hidden states ``[..., H]`` with the adapter off.
        lm_head_weight: the shared head ``[V, H]``.
        lm_head_bias: its ``[V]`` bias, or None.
        tokens: integer ids ``[...]`` (the hidden states' leading shape), each in ``[0, V)``.
        params: a ``PolicyParams`` (None: the defaults); ``alpha_tilde``, ``alpha_0`` override it.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (two logits rows).
        tile_budget_mb: scratch budget of the logits tiles (default $QADAPTER_TILE_BUDGET_MB or 64).

    Returns:
        ``[...]`` log-probabilities in fp32 (fp64 for fp64 inputs). Not differentiable.
    """
    check_hidden_and_head(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias)
    check_index_tensor("tokens", tokens)
    device = adapter_hidden.device
    check_same_device("adapter_hidden", device, tokens=tokens)
    lead = tuple(adapter_hidden.shape[:-1])
    if tuple(tokens.shape) != lead:
        raise ValueError(f"tokens must have the leading shape of adapter_hidden {list(lead)}, got {list(tokens.shape)}")
    policy = resolve(PolicyParams, params, overrides)
    budget = tile_budget(tile_budget_mb)
    backend = resolve_backend(backend, device)
    hidden = adapter_hidden.shape[-1]
    flat_tokens = tokens.reshape(-1).long()
    out = log_probs_hidden_rows(adapter_hidden.reshape(-1, hidden), base_hidden.reshape(-1, hidden), lm_head_weight,
                                lm_head_bias, flat_tokens, policy, backend, budget)
    if value_checks_enabled(device):
        vocab = lm_head_weight.shape[0]
        raise_on_flags({
            f"tokens must be token ids in [0, {vocab})": ((flat_tokens < 0) | (flat_tokens >= vocab)).any(),
            # Finite inputs give finite log-probabilities; NaN or inf anywhere in them does not.
            "adapter_hidden, base_hidden, lm_head_weight or lm_head_bias hold NaN or inf (non-finite log-probabilities)":
                ~out.isfinite().all(),
        })
    return out.reshape(lead)
