"""The public vocabulary pass: soft values and picked residual Q, with its argument checks."""
import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.residual_q_values import residual_q_values_rows
from .checks import (
    actions_in_range_flag,
    check_alphas,
    check_index_tensor,
    check_logits_pair,
    check_same_device,
    check_shape,
    finite_values_flag,
    raise_on_flags,
    value_checks_enabled,
)


def q_values_rows(q_logits, base_logits, actions, alpha_tilde, alpha_0, backend: str):
    """[N, V] logits and int64 [N] actions -> (values, q_taken) on a resolved backend; no checks."""
    if backend == "torch":
        return reference.residual_q_values(q_logits, base_logits, actions, alpha_tilde, alpha_0)
    return residual_q_values_rows(q_logits, base_logits, actions, alpha_tilde, alpha_0,
                                  through_dispatcher(backend, q_logits.device))


def residual_q_values(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    actions: torch.Tensor,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft values and picked residual Q for every position, in one pass over the vocabulary.

    Args:
        q_logits: ``[..., V]`` adapter logits Q (fp32, bf16, fp16 or fp64); receives gradients.
        base_logits: ``[..., V]`` frozen base-model logits L, same shape and dtype; no gradient.
        actions: ``[...]`` integer token ids in ``[0, V)``: the action whose Q is picked.
        alpha_tilde: temperature of the customised policy (> 0).
        alpha_0: weight of the base log-policy (>= 0).
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (the reference).

    Returns:
        ``(values, q_taken)``, both ``[...]`` in fp32 (fp64 for fp64 logits):
        ``V = alpha_tilde * LSE((Q + alpha_0 L) / alpha_tilde) - alpha_0 * LSE(L)`` and ``Q[a]``.
    """
    check_logits_pair(q_logits, base_logits)
    check_index_tensor("actions", actions)
    check_same_device("q_logits", q_logits.device, actions=actions)
    check_shape("actions", actions, tuple(q_logits.shape[:-1]), "q_logits without its last dimension")
    alpha_tilde, alpha_0 = check_alphas(alpha_tilde, alpha_0)
    backend = resolve_backend(backend, q_logits.device)
    vocab = q_logits.shape[-1]
    check_values = value_checks_enabled(q_logits.device)
    if check_values:
        raise_on_flags(actions_in_range_flag("actions", actions, vocab))
    values, q_taken = q_values_rows(
        q_logits.reshape(-1, vocab), base_logits.reshape(-1, vocab), actions.reshape(-1).long(),
        alpha_tilde, alpha_0, backend,
    )
    if check_values:
        raise_on_flags(finite_values_flag(values))
    return values.view(actions.shape), q_taken.view(actions.shape)
