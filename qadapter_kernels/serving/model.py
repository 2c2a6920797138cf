"""The vLLM model class: a decoder that generates from the Q-Adapter's customised policy.

One class serves every family in ``DECODER_MODELS`` (Llama, Mistral, Qwen2, Qwen3): it builds the
family's own vLLM decoder stack, so vLLM's weight loader, kernels and caches are the family's, and
walks its layers with two streams. The base stream and the adapter stream share each projection's
product (the rows of both streams in one GEMM, so every base weight is read once per step, as plain
vLLM reads it, and used in place, never copied); the LoRA deltas are added to the adapter rows only,
and each stream attends through its own ``Attention`` module, so vLLM allocates the adapter stream a
KV cache of its own (same block table: prefix caching covers both streams). The model returns
``h_c = (h_q + alpha_0 * h_b) / alpha_tilde`` and ``compute_logits`` applies the shared LM head
once: ``W h_c`` equals the customised policy's logits up to a per-row constant (DESIGN.md §2b; these
heads have no bias), so vLLM's sampler, log-probs, penalties and OpenAI server act on the
customised policy unchanged.

Several adapters of one base model share an engine: each request's route (``serving.routing``:
the adapter it named, or the base model, and its own strength) reaches the forward by batch row;
the LoRA pairs of each adapter are added to its requests' rows, and ``h_c`` is formed per token with
that request's alphas. A step whose requests all chose the base model runs the base stream alone,
as plain vLLM does; in a mixed step the base model's requests take ``h_b``. Under tensor parallelism
each rank adds its share of every delta (``adapter.rank_share``) to its share of the projection.

Selected through the HF config (``settings.engine_arguments`` builds the override):
``architectures = ["QAdapterForCausalLM"]`` and ``qadapter = {"adapters": [{"name": ...,
"adapter": DIR, "alpha_tilde": ..., "alpha_0": ...}, ...], "enabled": bool, "base_name": ...}``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import (get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size,
                              tensor_model_parallel_all_reduce)
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.mistral import MistralModel
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3Model
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix
from vllm.sequence import IntermediateTensors

from ..params import PolicyParams
from .adapter import COLUMN_PARALLEL, DecoderShapes, LoraPair, load_served_adapter, rank_share
from .routing import active_routing
from .settings import BASE_ROUTE, RequestRoute, ServingSettings, check_base_config, decoder_shapes

__all__ = ["DECODER_MODELS", "QAdapterForCausalLM"]

# model_type -> the vLLM decoder stack the family's own causal-LM class builds (settings.SUPPORTED_MODEL_TYPES).
DECODER_MODELS: dict[str, type[nn.Module]] = {"llama": LlamaModel, "mistral": MistralModel, "qwen2": Qwen2Model,
                                              "qwen3": Qwen3Model}


@dataclass(frozen=True)
class TokenRoutes:
    """The routes of one step's tokens: per adapter present, the token rows it owns (None: every row),
    the rows of base-model requests, and the policy with every token's alphas ([T, 1] tensors)."""

    adapters: list[tuple[int, torch.Tensor | None]]
    base_rows: torch.Tensor | None  # bool [T, 1]; None: no base-model request in the step
    policy: PolicyParams


def _query_start_loc() -> torch.Tensor | None:
    """The step's first token of each request (and the end), from the attention metadata."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0] if metadata else None
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    return getattr(metadata, "query_start_loc", None)


class _AdapterStream(nn.Module):
    """The adapter stream's own attention layers (its KV caches) and every adapter's LoRA; no base weight."""

    def __init__(self, vllm_config: VllmConfig, layers: nn.ModuleList, prefix: str):
        super().__init__()
        self.attn = nn.ModuleList()
        for index, layer in enumerate(layers):
            base = layer.self_attn.attn
            # Same geometry as the base layer's attention; a distinct prefix gives it its own cache.
            self.attn.append(Attention(
                base.num_heads, base.head_size, base.impl.scale, num_kv_heads=base.num_kv_heads,
                cache_config=vllm_config.cache_config, quant_config=None,
                per_layer_sliding_window=base.sliding_window, attn_type=base.attn_type,
                prefix=f"{prefix}.layers.{index}.self_attn.attn"))
        self.lora: dict[tuple[int, int, str], LoraPair] = {}
        self.tp_world = get_tensor_model_parallel_world_size()

    def set_lora(self, loras: list[dict[tuple[int, str], LoraPair]], shapes: DecoderShapes,
                 device: torch.device) -> None:
        """Installs every adapter's fused LoRA pairs, this tensor-parallel rank's share of each
        (``adapter.rank_share``), as buffers (so they move and count with the model's state)."""
        self.lora = {}
        rank = get_tensor_model_parallel_rank()
        for adapter, lora in enumerate(loras):
            for (layer, projection), pair in lora.items():
                pair = rank_share(pair, projection, shapes, rank, self.tp_world)
                a, b = pair.a.to(device), pair.b.to(device)
                self.register_buffer(f"lora_{adapter}_{layer}_{projection}_a", a, persistent=False)
                self.register_buffer(f"lora_{adapter}_{layer}_{projection}_b", b, persistent=False)
                self.lora[(adapter, layer, projection)] = LoraPair(a, b)

    def forward(self, model: nn.Module, input_ids: torch.Tensor | None, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None, routes: TokenRoutes | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(base hidden, adapter hidden) [T, H] after the final norm, both streams in one walk of the layers."""
        embeds = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        tokens = embeds.shape[0]
        hidden = torch.cat([embeds, embeds])  # base rows, then adapter rows
        both_positions = torch.cat([positions, positions])
        adapters = routes.adapters if routes is not None else [(0, None)]
        residual = None
        for index, layer in enumerate(model.layers):
            hidden, residual = self._layer(index, layer, tokens, both_positions, hidden, residual, adapters)
        hidden, _ = model.norm(hidden, residual)
        return hidden[:tokens], hidden[tokens:]

    def _lora(self, out: torch.Tensor, x: torch.Tensor, tokens: int, index: int, projection: str,
              adapters: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """out with each adapter's LoRA delta of ``projection`` added to its rows among the adapter rows."""
        out_adapter, x_adapter = out[tokens:], x[tokens:]
        for adapter, rows in adapters:
            pair = self.lora.get((adapter, index, projection))
            if pair is None:
                continue
            if rows is None:  # one adapter in the step: every adapter row (a base request's row is dropped later)
                out_adapter += F.linear(self._low_rank(x_adapter, pair, projection), pair.b)
            else:
                out_adapter.index_add_(0, rows, F.linear(self._low_rank(x_adapter[rows], pair, projection), pair.b))
        return out

    def _low_rank(self, x: torch.Tensor, pair: LoraPair, projection: str) -> torch.Tensor:
        # A row-parallel rank holds a slice of x and of a: the ranks' products sum to x @ a.T.
        low = F.linear(x, pair.a)
        if self.tp_world > 1 and projection not in COLUMN_PARALLEL:
            low = tensor_model_parallel_all_reduce(low)
        return low

    def _layer(self, index: int, layer: nn.Module, tokens: int, positions: torch.Tensor, hidden: torch.Tensor,
               residual: torch.Tensor | None, adapters: list) -> tuple[torch.Tensor, torch.Tensor]:
        # The family's decoder-layer forward over both streams' rows, the LoRA deltas on the adapter rows.
        if residual is None:
            residual, hidden = hidden, layer.input_layernorm(hidden)
        else:
            hidden, residual = layer.input_layernorm(hidden, residual)
        attn = layer.self_attn
        qkv = self._lora(attn.qkv_proj(hidden)[0], hidden, tokens, index, "qkv_proj", adapters)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm per head of q and k before the rotation
            q = attn.q_norm(q.view(*q.shape[:-1], -1, attn.head_dim)).view(q.shape)
            k = attn.k_norm(k.view(*k.shape[:-1], -1, attn.head_dim)).view(k.shape)
        q, k = attn.rotary_emb(positions, q, k)
        context = torch.cat([attn.attn(q[:tokens], k[:tokens], v[:tokens]),
                             self.attn[index](q[tokens:], k[tokens:], v[tokens:])])
        hidden = self._lora(attn.o_proj(context)[0], context, tokens, index, "o_proj", adapters)
        hidden, residual = layer.post_attention_layernorm(hidden, residual)
        mlp = layer.mlp
        gate_up = self._lora(mlp.gate_up_proj(hidden)[0], hidden, tokens, index, "gate_up_proj", adapters)
        activated = mlp.act_fn(gate_up)
        hidden = self._lora(mlp.down_proj(activated)[0], activated, tokens, index, "down_proj", adapters)
        return hidden, residual


class QAdapterForCausalLM(nn.Module):
    """vLLM model class for a base model of ``DECODER_MODELS`` plus a saved Q-Adapter (module docstring)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_base_config(config)
        if get_pp_group().world_size != 1:
            raise NotImplementedError("the Q-Adapter vLLM plug-in runs without pipeline parallelism "
                                      "(pipeline-parallel size 1; tensor parallelism is supported)")
        if vllm_config.quant_config is not None:
            raise NotImplementedError("the Q-Adapter vLLM plug-in needs an unquantised base model")
        self.settings = ServingSettings.from_hf_config(config)
        self.config = config
        self.model = DECODER_MODELS[config.model_type](vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        # Read and checked now, so a bad adapter fails before any weight or cache is allocated.
        dtype = vllm_config.model_config.dtype
        self.shapes = decoder_shapes(config)
        self.served = [load_served_adapter(a.adapter, self.shapes, dtype) for a in self.settings.adapters]
        self.policies = [a.policy(s.policy) for a, s in zip(self.settings.adapters, self.served)]
        self._route_policies: dict[RequestRoute, PolicyParams] = {}
        self.adapter_stream = (_AdapterStream(vllm_config, self.model.layers, maybe_prefix(prefix, "qadapter"))
                               if self.settings.enabled else None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        routes = self._token_routes(positions.shape[0], positions.device) if self.adapter_stream is not None else None
        if self.adapter_stream is None or (routes is not None and not routes.adapters):
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)  # the base model alone
        base_hidden, adapter_hidden = self.adapter_stream(self.model, input_ids, positions, inputs_embeds, routes)
        if routes is None:
            return self.policies[0].combined_hidden(adapter_hidden, base_hidden)
        combined = routes.policy.combined_hidden(adapter_hidden, base_hidden)
        return combined if routes.base_rows is None else torch.where(routes.base_rows, base_hidden, combined)

    def _token_routes(self, tokens: int, device: torch.device) -> TokenRoutes | None:
        """The step's routes per token; None when every request takes the first adapter at the engine's strength."""
        routing, starts = active_routing(), _query_start_loc()
        if routing is None or not routing.rows or starts is None:
            return None
        lengths = starts.diff().cpu()
        default = RequestRoute(0)
        row_routes = [routing.rows.get(row, default) for row in range(lengths.numel())]
        row_routes += [default]  # the tokens past the last request's (padding), if any
        lengths = torch.cat([lengths, torch.tensor([tokens - int(lengths.sum())])])
        policies = [self._route_policy(r) for r in row_routes]
        per_token = torch.repeat_interleave(torch.tensor([r.index for r in row_routes]), lengths)
        alphas = torch.repeat_interleave(torch.tensor([[p.alpha_tilde, p.alpha_0] for p in policies]), lengths, dim=0)
        present = sorted(set(per_token.tolist()) - {BASE_ROUTE})
        adapters = ([(present[0], None)] if len(present) == 1 else
                    [(a, (per_token == a).nonzero().squeeze(1).to(device)) for a in present])
        is_base = (per_token == BASE_ROUTE)
        dtype = self.model.embed_tokens.weight.dtype
        return TokenRoutes(adapters, is_base[:, None].to(device) if bool(is_base.any()) else None,
                           PolicyParams(alpha_tilde=alphas[:, :1].to(device, dtype), alpha_0=alphas[:, 1:].to(device, dtype)))

    def _route_policy(self, route: RequestRoute) -> PolicyParams:
        """A route's policy, validated once per distinct route (not at every step); the base model's: any."""
        if route not in self._route_policies:
            self._route_policies[route] = (route.policy(self.policies[route.index]) if route.index != BASE_ROUTE
                                           else PolicyParams())
        return self._route_policies[route]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base checkpoint through vLLM's loader; then the LoRA, moved next to the base weights."""
        loaded = AutoWeightsLoader(self).load_weights(weights)
        if self.adapter_stream is not None:
            self.adapter_stream.set_lora([s.lora for s in self.served], self.shapes, self.model.embed_tokens.weight.device)
        return loaded
