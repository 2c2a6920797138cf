"""How a decoding step gets the last hidden states of the two streams (adapter on, adapter off).

Each class holds the KV cache(s) of one ``generate`` call and is used as a context manager
around the whole loop. ``step`` takes the tokens new since the last step ([B, n]: the prompt
at the first step, one token after that), the attention mask over everything so far and the
positions of the new tokens, and returns one tensor per stream, the adapters' first and the base
model's last: ``(adapter_hidden, base_hidden)`` for the model's own adapter, or
``(*adapter_hiddens, base_hidden)`` for the named ``adapter_names`` of a composition
(``composition.py``). Each is [B, H]: the decoder's final (normalised) hidden states at the last
position, which the LM head reads; or, built with ``logits=True``, the whole causal LM's logits
rows [B, V] there (for models whose logits the head alone does not give: ``qadapter_kernels.logit_identity``).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence

import peft
import torch

from .kv_cache import reserved_cache
from .lora_rows import BASE_ADAPTER_NAME, sliced_lora_routing

# The peft versions whose private mixed-batch hook (below) decoding was tested with; setup.py's pin.
TESTED_PEFT_VERSIONS = ">=0.21,<0.22"


class UnsupportedPeftError(RuntimeError):
    """The installed peft lacks the private hook that routes each row of a batch through its adapter."""


def mixed_batch_hooks(peft_model, adapter_names: list[str]):
    """Row ``i`` of every forward in the block runs through adapter ``adapter_names[i]``.

    By slicing (``lora_rows.sliced_lora_routing``) where the rows form one block per adapter and every
    LoRA layer is a plain one; otherwise through peft's private
    ``_enable_peft_forward_hooks(adapter_names=...)``, checked before it is trusted. That hook is what
    ``peft``'s own ``generate(adapter_names=...)`` uses, but it is private: when a peft version lacks it
    (on the PeftModel or on the LoRA model it delegates to) or no longer takes keyword arguments, a
    silent fallback would run every row WITH the adapter, so this raises.
    """
    sliced = sliced_lora_routing(peft_model, adapter_names)
    if sliced is not None:
        return sliced
    hooks = []
    for owner in (peft_model, getattr(peft_model, "base_model", None)):
        hook = getattr(owner, "_enable_peft_forward_hooks", None)
        if hook is None or not any(p.kind is inspect.Parameter.VAR_KEYWORD or p.name == "adapter_names"
                                   for p in inspect.signature(hook).parameters.values()):
            raise UnsupportedPeftError(
                f"mixed-batch decoding needs peft's {type(owner).__name__}._enable_peft_forward_hooks(adapter_names=)"
                f", which peft {peft.__version__} does not have; it was tested with peft{TESTED_PEFT_VERSIONS}. "
                "Install that, or decode with two_pass=True (two forwards per token)")
        hooks.append(hook)
    return hooks[0](adapter_names=adapter_names)


def adapter_off(peft_model) -> contextlib.AbstractContextManager:
    """Every forward in the block runs without an adapter: in this thread only where the LoRA layers
    can be sliced (``lora_rows``), else through peft's ``disable_adapter()``, which every thread sees."""
    return sliced_lora_routing(peft_model, None) or peft_model.disable_adapter()


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt: 0 at each row's first real token (padding gets 0 too)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def cache_keyword(decoder: torch.nn.Module) -> str:
    # transformers renamed the decoders' ``past_key_values`` argument to ``cache``.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class _Streams(contextlib.ExitStack):
    # One reserved-buffer KV cache per stream group (kv_cache.py): appends in place, no copy of the
    # whole cache per token; ``max_length`` (prompt + new tokens) is the room it reserves.
    def __init__(self, model, caches: int, logits: bool, max_length: int):
        super().__init__()
        self._logits = logits
        self._forward = model.base_causal_lm if logits else model.decoder
        self._keyword = cache_keyword(self._forward)
        self._caches = [reserved_cache(model.base_causal_lm.config, max_length) for _ in range(caches)]
        self._peft_model = model.peft_model

    def _last_hidden(self, cache: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._logits else {}
        out = self._forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **extra, **{self._keyword: self._caches[cache]})
        return (out.logits if self._logits else out[0])[:, -1]

    def _base_hidden(self, cache: int, *inputs) -> torch.Tensor:
        with adapter_off(self._peft_model):
            return self._last_hidden(cache, *inputs)


class MixedBatchStreams(_Streams):
    """Every stream in ONE forward over (K + 1) B rows and one KV cache.

    Rows ``i B .. (i + 1) B - 1`` run with adapter ``adapter_names[i]`` (default: the model's active
    adapter), the last B rows as peft's ``"__base__"``: the streams share every weight but the LoRA
    deltas, so each weight is read once per token instead of K + 1 times.
    """

    def __init__(self, model, rows: int, max_length: int, logits: bool = False,
                 adapter_names: Sequence[str] | None = None):
        super().__init__(model, caches=1, logits=logits, max_length=max_length)
        self._rows = rows
        groups = (*_adapters(model, adapter_names), BASE_ADAPTER_NAME)
        self._groups = len(groups)
        self._names = [name for name in groups for _ in range(rows)]

    def __enter__(self):
        super().__enter__()
        # The hooks that route each row through its adapter are registered once for the whole loop.
        self.enter_context(mixed_batch_hooks(self._peft_model, self._names))
        return self

    def step(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, ...]:
        repeated = (t.repeat(self._groups, 1) for t in (input_ids, attention_mask, position_ids))
        return tuple(self._last_hidden(0, *repeated).split(self._rows))


class TwoPassStreams(_Streams):
    """The authors' scheme: one forward per adapter and one without, each with its own cache."""

    def __init__(self, model, rows: int, max_length: int, logits: bool = False,
                 adapter_names: Sequence[str] | None = None):
        self._names = _adapters(model, adapter_names)
        super().__init__(model, caches=len(self._names) + 1, logits=logits, max_length=max_length)
        self._active = model.peft_model.active_adapter
        self._rows = rows

    def _adapter_hidden(self, index: int, *inputs) -> torch.Tensor:
        name = self._names[index]
        if name == self._active:  # the adapter a plain forward runs: no private peft hook needed
            return self._last_hidden(index, *inputs)
        with mixed_batch_hooks(self._peft_model, [name] * self._rows):
            return self._last_hidden(index, *inputs)

    def step(self, *inputs) -> tuple[torch.Tensor, ...]:
        adapters = tuple(self._adapter_hidden(i, *inputs) for i in range(len(self._names)))
        return (*adapters, self._base_hidden(len(self._names), *inputs))


class BaseOnlyStreams(_Streams):
    """The base model alone (adapter off); both "streams" are its hidden states."""

    def __init__(self, model, rows: int, max_length: int, logits: bool = False):
        super().__init__(model, caches=1, logits=logits, max_length=max_length)

    def step(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._base_hidden(0, *inputs)
        return hidden, hidden


def _adapters(model, adapter_names: Sequence[str] | None) -> tuple[str, ...]:
    return (model.peft_model.active_adapter,) if adapter_names is None else tuple(adapter_names)
