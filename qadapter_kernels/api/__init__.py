"""The public functions, each with its argument checks (at most one host sync per call)."""
from ..ops.native import (  # what the CPU kernels run as: their ISA and their kept output block
    cached_memory_bytes,
    cached_memory_limit_bytes,
    cpu_capability,
    release_cached_memory,
    set_cached_memory_limit,
)
from .log_probs import combined_log_probs_from_hidden
from .loss import fused_linear_qadapter_loss, qadapter_loss
from .q_values import residual_q_values
from .sampling import combined_logits, combined_sample, combined_sample_from_hidden

__all__ = [
    "cached_memory_bytes",
    "cached_memory_limit_bytes",
    "cpu_capability",
    "release_cached_memory",
    "set_cached_memory_limit",
    "combined_log_probs_from_hidden",
    "combined_logits",
    "combined_sample",
    "combined_sample_from_hidden",
    "fused_linear_qadapter_loss",
    "qadapter_loss",
    "residual_q_values",
]
