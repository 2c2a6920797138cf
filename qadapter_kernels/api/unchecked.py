"""Internal entry points without argument checks or host syncs, for callers that validated once up
front and call per step: ``generate`` (one per decoded token) and the trainer.

Arguments must already be what the public functions would pass on: resolved parameters, a
resolved backend, tensors of the right shapes, dtypes and devices. Nothing here reads a tensor
value on the host, so the caller decides when (and whether) to sync.
"""
from .log_probs import log_probs_hidden_rows
from .loss import fused_linear_values, pair_pass
from .sampling import RowSampling, as_generator, check_sampling_parameters, sample_hidden_rows, sample_logits_rows

__all__ = [
    "RowSampling",
    "as_generator",
    "check_sampling_parameters",
    "fused_linear_values",
    "log_probs_hidden_rows",
    "pair_pass",
    "sample_hidden_rows",
    "sample_logits_rows",
]
