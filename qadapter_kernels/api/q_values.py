"""The public vocabulary pass: soft values and picked residual Q, with its argument checks."""
import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.residual_q_values import residual_q_values_rows
from ..params import PolicyParams, resolve, with_param_keywords
from .checks import (
    check_index_tensor,
    check_logits_pair,
    check_same_device,
    check_shape,
    finite_values_flag,
    guard_actions,
    ids_in_range_flag,
    raise_on_flags,
    value_checks_enabled,
)


def q_values_rows(q_logits, base_logits, actions, alpha_tilde: float, alpha_0: float, backend: str):
    """[N, V] logits and int64 [N] actions in range -> (values, q_taken) on a resolved backend; no checks."""
    if backend == "torch":
        return reference.residual_q_values(q_logits, base_logits, actions, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    return residual_q_values_rows(q_logits, base_logits, actions, alpha_tilde, alpha_0,
                                  through_dispatcher(backend, q_logits.device))


@with_param_keywords(PolicyParams)
def residual_q_values(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    actions: torch.Tensor,
    params: PolicyParams | None = None,
    *,
    backend: str | None = None,
    **overrides,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft values and picked residual Q for every position, in one pass over the vocabulary.

    Args:
        q_logits: ``[..., V]`` adapter logits Q (fp32, bf16, fp16 or fp64); receives gradients.
        base_logits: ``[..., V]`` frozen base-model logits L, same shape and dtype; no gradient.
        actions: ``[...]`` integer token ids in ``[0, V)``: the action whose Q is picked.
        params: a ``PolicyParams`` (or a ``QAdapterParams``; None: the defaults); the keywords
            ``alpha_tilde`` (> 0, the policy's temperature) and ``alpha_0`` (>= 0, the weight of the
            base log-policy) override it.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (the reference).

    Returns:
        ``(values, q_taken)``, both ``[...]`` in fp32 (fp64 for fp64 logits):
        ``V = alpha_tilde * LSE((Q + alpha_0 L) / alpha_tilde) - alpha_0 * LSE(L)`` and ``Q[a]``.
        One host sync (the value checks), none under torch.compile or CUDA-graph capture.
    """
    check_logits_pair(q_logits, base_logits)
    check_index_tensor("actions", actions)
    check_same_device("q_logits", q_logits.device, actions=actions)
    check_shape("actions", actions, tuple(q_logits.shape[:-1]), "q_logits without its last dimension")
    p = resolve(PolicyParams, params, overrides)
    backend = resolve_backend(backend, q_logits.device)
    vocab = q_logits.shape[-1]
    flags = {} if value_checks_enabled(q_logits.device) else None
    if flags is not None:
        flags.update(ids_in_range_flag("actions", actions, vocab))
    safe_actions, bad_actions = guard_actions(actions.reshape(-1).long(), vocab)
    values, q_taken = q_values_rows(q_logits.reshape(-1, vocab), base_logits.reshape(-1, vocab), safe_actions,
                                    p.alpha_tilde, p.alpha_0, backend)
    q_taken = torch.where(bad_actions, float("nan"), q_taken)
    if flags is not None:
        flags.update(finite_values_flag(values, "q_logits or base_logits", p.alpha_0))
        raise_on_flags(flags)
    return values.view(actions.shape), q_taken.view(actions.shape)
