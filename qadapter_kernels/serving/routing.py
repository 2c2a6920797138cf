"""Which adapter, at what strength, each request of the running batch decodes with.

vLLM gives a model's forward the batch's tokens but not its requests; a logits processor is told
each request's ``SamplingParams`` as it joins the persistent batch, and of every removal and move.
``QAdapterRouting`` keeps each request's route (``settings.request_route`` of its ``extra_args``) by
batch row, leaves the logits alone, and the model (``serving.model``) reads the routes of the rows
it runs with ``active_routing()``, the processor of the engine built last in this process. vLLM
validates every request's parameters with ``validate_params`` before it reaches the engine: a name
the engine does not serve, or a strength out of range, is a 400 error on the server.
"""
from __future__ import annotations

import logging

import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from .settings import RequestRoute, ServingSettings, request_route, served_routes

__all__ = ["QAdapterRouting", "active_routing"]

_log = logging.getLogger(__name__)
_ACTIVE: list[QAdapterRouting] = []


def active_routing() -> QAdapterRouting | None:
    """The routing processor of the engine built last in this process, or None (no routes: the default)."""
    return _ACTIVE[-1] if _ACTIVE else None


class QAdapterRouting(LogitsProcessor):
    """Per batch row, the route of a request that chose one (rows absent: the default adapter)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self.routes = ServingSettings.from_hf_config(vllm_config.model_config.hf_config).routes()
        self.rows: dict[int, RequestRoute] = {}
        _ACTIVE[:] = [self]

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_route(sampling_params.extra_args, served_routes())

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _prompt, _output: self._route(params))

    def _route(self, params: SamplingParams) -> RequestRoute | None:
        try:
            return request_route(params.extra_args, self.routes)
        except ValueError as e:  # validated before the engine unless the engine's routes were never recorded
            _log.error("Q-Adapter request route refused, the default adapter decodes it: %s", e)
            return None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
