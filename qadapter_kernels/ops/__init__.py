"""The op layer: Triton kernels, their launchers, fake and autograd registration; no argument checks.

One file per op. Importing this package loads the C++ extension (op schemas and CPU kernels)
and registers every op's CUDA kernels and autograd formula. ``TRITON_KERNELS`` lists every
Triton kernel with the argument types it must compile for (the sm_90 compile check reads it).
"""
from . import native  # noqa: F401  (loads the qadapter:: op schemas and the CPU kernels for this CPU)
from . import fused_linear, log_probs, pair_loss, residual_q_values, sampling  # noqa: F401  (register their kernels)
from .registration import TRITON_KERNELS

__all__ = ["TRITON_KERNELS", "fused_linear", "log_probs", "pair_loss", "residual_q_values", "sampling"]
