"""The ``vllm.general_plugins`` entry point: registers the Q-Adapter model class with vLLM.

vLLM calls ``register`` in every process it starts (API server, engine core, workers); the class
is named by its import path, so vLLM imports it only where a model is built.
"""
from __future__ import annotations

__all__ = ["ARCHITECTURE", "ROUTING_PROCESSOR", "register"]

ARCHITECTURE = "QAdapterForCausalLM"
# The logits processor that reads each request's adapter and strength (``serving.routing``), by vLLM's FQCN.
ROUTING_PROCESSOR = "qadapter_kernels.serving.routing:QAdapterRouting"


def register() -> None:
    """Makes ``ARCHITECTURE`` known to ``vllm.ModelRegistry`` (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "qadapter_kernels.serving.model:QAdapterForCausalLM")
