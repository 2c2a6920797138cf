"""Q-Adapter decoding inside plain ``transformers`` ``generate``, as a logits processor."""
from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessor

from ..api import combined_logits
from ..params import PolicyParams, resolve
from .composition import check_adapter_weights, composition
from .streams import BASE_ADAPTER_NAME, adapter_off, cache_keyword, mixed_batch_hooks, prompt_positions

__all__ = ["QAdapterLogitsProcessor"]


class QAdapterLogitsProcessor(LogitsProcessor):
    """Turns the adapter's logits Q into the customised policy's logits during ``generate``.

    Run transformers' ``generate`` on the model with the adapter ON (``qmodel.peft_model``): the
    ``scores`` it hands to processors are then Q. The processor runs the base model over the
    tokens that are new since its last call, with its own KV cache, and returns
    ``combined_logits(Q, L) = (Q + alpha_0 * log_softmax(L)) / alpha_tilde``. Processors given
    to ``generate`` run before its temperature / top-k / top-p / min-p warpers, so those then
    filter the combined policy in Hugging Face's order (docs/DESIGN.md §2)::

        processor = QAdapterLogitsProcessor(qmodel, attention_mask=batch["attention_mask"])
        qmodel.peft_model.generate(**batch, logits_processor=[processor], do_sample=True, top_p=0.9)

    ``base``: a ``QAdapterModel`` (its base pass is its own model with the adapter switched off;
    alphas default to its config) or any causal LM to use as pi_1 (alphas default to 1.0, 0.01).
    ``attention_mask``: the prompt's mask, needed for left-padded batches (None: no padding).
    ``adapters``: ``{name: weight}`` composes adapters loaded in ``base`` (a ``QAdapterModel``), as
    ``QAdapterModel.generate(adapters=...)`` does: the ``scores`` are taken as the active adapter's Q
    (weight 0 when it is not named), and the processor's own pass runs the other named adapters and
    the base model as row groups of one forward. What transformers' own processors did to the scores
    (a -inf ban) is then scaled by the active adapter's weight, and lost where that weight is 0.

    Limits: one processor per ``generate`` call (it holds that call's cache); greedy or
    multinomial sampling only (no beam search, assisted or contrastive decoding,
    ``num_return_sequences`` > 1); processors that transformers puts before custom ones
    (repetition penalty, bad words...) act on Q, not on the combined logits. Each token costs
    two forward passes and two full logits rows: ``QAdapterModel.generate`` does it in one.
    """

    def __init__(self, base, alpha_tilde: float | None = None, alpha_0: float | None = None,
                 attention_mask: torch.Tensor | None = None, adapters: dict | None = None):
        config = getattr(base, "qadapter_config", None)
        self._qadapter = base if config is not None else None
        self._causal_lm = base.base_causal_lm if config is not None else base
        if not callable(getattr(self._causal_lm, "get_output_embeddings", None)):
            raise TypeError(f"base must be a QAdapterModel or a causal LM, got {type(base).__name__}")
        start = config.policy if config is not None else PolicyParams()
        given = {name: value for name, value in (("alpha_tilde", alpha_tilde), ("alpha_0", alpha_0)) if value is not None}
        self.policy = resolve(PolicyParams, start, given)
        self.alpha_tilde, self.alpha_0 = self.policy.alpha_tilde, self.policy.alpha_0
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError("attention_mask must be the prompt's [B, T] mask or None")
        self._prompt_mask = attention_mask
        if adapters is not None and self._qadapter is None:
            raise TypeError("adapters= needs a QAdapterModel as base (the model that holds the adapters)")
        self._adapters = None if adapters is None else check_adapter_weights(adapters, base.adapter_names)
        self._composition = None
        self._groups: tuple[str, ...] = (BASE_ADAPTER_NAME,)  # the row groups of the processor's own forward
        self._keyword = cache_keyword(self._causal_lm)
        self._cache = None
        self._mask = None
        self._seen = 0

    def _own_logits(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The last logits row of each of ``self._groups`` (the base model's last)."""
        rows, length = input_ids.shape
        if self._cache is None:
            mask = self._prompt_mask if self._prompt_mask is not None else torch.ones_like(input_ids)
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {list(mask.shape)} does not match the prompt {list(input_ids.shape)}")
            self._cache = DynamicCache(config=self._causal_lm.config)
            self._mask = mask.to(input_ids.device).long()
            positions = prompt_positions(self._mask)
        else:
            if rows != self._mask.shape[0] or length <= self._seen:
                raise ValueError("a QAdapterLogitsProcessor serves one generate call with a fixed batch (no beam "
                                 "search or num_return_sequences > 1): create a new one per call")
            last = self._mask.sum(-1, keepdim=True) - 1
            self._mask = torch.cat([self._mask, self._mask.new_ones(rows, length - self._seen)], 1)
            positions = last + torch.arange(1, length - self._seen + 1, device=input_ids.device)
        groups = len(self._groups)
        new, mask, positions = (t.repeat(groups, 1) for t in (input_ids[:, self._seen:], self._mask, positions))
        self._seen = length
        kwargs = dict(attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                      **{self._keyword: self._cache})
        if self._qadapter is None:
            return (self._causal_lm(new, **kwargs).logits[:, -1],)
        peft_model = self._qadapter.peft_model
        route = (adapter_off(peft_model) if groups == 1
                 else mixed_batch_hooks(peft_model, [name for name in self._groups for _ in range(rows)]))
        with route:
            return self._causal_lm(new, **kwargs).logits[:, -1].split(rows)

    def _compose(self, input_ids: torch.Tensor) -> None:
        """At the first call (the batch size is known): the composition and the row groups it needs."""
        self._composition = composition(self._adapters, input_ids.shape[0], input_ids.device, self.policy)
        active = self._qadapter.peft_model.active_adapter
        self._groups = (*(name for name in self._composition.names if name != active), BASE_ADAPTER_NAME)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._adapters is not None and self._composition is None:
            self._compose(input_ids)
        *own, base_logits = self._own_logits(input_ids)
        if self._composition is not None:
            by_name = dict(zip(self._groups, own)) | {self._qadapter.peft_model.active_adapter: scores}
            scores = self._composition.q_logits([by_name[name] for name in self._composition.names], base_logits)
        return combined_logits(scores, base_logits.to(scores.dtype), self.policy)
