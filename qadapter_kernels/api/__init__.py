"""The public functions, each with its argument checks (at most one host sync per call)."""
from .log_probs import combined_log_probs_from_hidden
from .loss import fused_linear_qadapter_loss, qadapter_loss
from .q_values import residual_q_values
from .sampling import combined_logits, combined_sample, combined_sample_from_hidden

__all__ = [
    "combined_log_probs_from_hidden",
    "combined_logits",
    "combined_sample",
    "combined_sample_from_hidden",
    "fused_linear_qadapter_loss",
    "qadapter_loss",
    "residual_q_values",
]
