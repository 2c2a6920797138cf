"""Q-Adapter generation: one batched forward per token and the fused combined-logit sampler.

The customised policy samples from ``(Q + alpha_0 * log_softmax(L)) / alpha_tilde`` (docs/DESIGN.md
§2): Q from the model with the adapter on, L with it off. By default each token costs one
forward over a mixed batch (adapter rows and base rows, one KV cache; ``streams.py``), then
``combined_sample_from_hidden`` applies the LM head once, to the combined hidden state h_c
(docs/DESIGN.md §1 (the logit identity)); no logits row is stored. Where that identity does not hold (``qadapter_kernels.logit_identity``:
softcapped or scaled logits, a LoRA on the head) each stream's logits row comes from the whole
causal LM and ``combined_sample`` combines them, with a warning saying why. With ``adapters=`` several
adapters are composed (``composition.py``): K + 1 row groups in the one forward, one head product on
their mixed hidden state.
"""
from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Sequence

import torch

from ..api.checks import tile_budget
from .. import reference
from ..api.unchecked import (
    as_generator,
    check_sampling_parameters,
    log_probs_hidden_rows,
    sample_hidden_rows,
    sample_logits_rows,
)
from ..ops.backend import resolve_backend
from ..logit_identity import identity_break
from ..params import PolicyParams
from ..prompts import encode_prompt, in_trained_format
from .composition import check_adapter_weights, composition
from .cpu_linear import few_row_linears
from .streams import BaseOnlyStreams, MixedBatchStreams, TwoPassStreams, prompt_positions

__all__ = ["encode_prompt_as_trained", "generate", "generate_text", "special_token_ids"]


def _check_prompt(input_ids, attention_mask, weight: torch.Tensor) -> torch.Tensor:
    """Validates the prompt batch against the LM head ``weight``; returns the attention mask (all ones when None)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a LongTensor [B, T], got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, T] with B, T >= 1, got {list(input_ids.shape)}")
    if input_ids.device != weight.device:
        raise ValueError(f"input_ids is on {input_ids.device}, the model on {weight.device}")
    vocab = weight.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must match input_ids {list(input_ids.shape)}, got {shape}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, input_ids on {input_ids.device}")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    # Left padding: zeros, then ones, at least one. A right-padded row would be decoded from a pad.
    if not bool((mask[:, -1] == 1).all() and (mask.diff(dim=1) >= 0).all()):
        raise ValueError("attention_mask must be left-padded (0s before 1s, every row ending in a real token); "
                         "tokenize batched prompts with padding_side='left'")
    real = input_ids[mask.bool()]
    if bool(((real < 0) | (real >= vocab)).any()):
        raise ValueError(f"input_ids must lie in [0, {vocab}) where attention_mask is 1")
    return mask


def _token_ids(name: str, value) -> list[int]:
    values = [value] if isinstance(value, numbers.Integral) else list(value)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TypeError(f"{name} must be a token id >= 0 or a list of them, got {value!r}")
    return [int(v) for v in values]


def special_token_ids(model, tokenizer, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
    """EOS ids and the pad id: given, else the model's generation config, else its config, else the tokenizer's."""
    sources = [getattr(model.base_causal_lm, "generation_config", None), model.base_causal_lm.config, tokenizer]

    def first(field):
        return next((getattr(s, field) for s in sources if getattr(s, field, None) is not None), None)

    if eos_token_id is None:
        eos_token_id = first("eos_token_id")
    eos = _token_ids("eos_token_id", eos_token_id) if eos_token_id is not None else []
    pad = pad_token_id if pad_token_id is not None else first("pad_token_id")
    if pad is None and eos:
        pad = eos[0]
    if pad is not None:
        pad = _token_ids("pad_token_id", pad)[0]
    return eos, pad


class _StopStrings:
    """Finds rows whose generated text contains a stop string (looking at its last tokens only).

    The text is the visible one (special tokens skipped), the text ``generate_text`` returns:
    special tokens end a row through ``eos_token_id``.
    """

    def __init__(self, stop_strings, tokenizer):
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop_strings must be a non-empty string or a list of them, got {stop_strings!r}")
        if tokenizer is None:
            raise ValueError("stop_strings need a tokenizer= to turn tokens into text")
        self.strings, self._tokenizer = strings, tokenizer
        # A token decodes to at least one character or to bytes completed by the next one or two.
        self._window = max(map(len, strings)) + 4

    def hits(self, new_tokens: list[torch.Tensor], rows: list[int]) -> list[int]:
        """The rows among ``rows`` whose last tokens (``new_tokens``: one [B] tensor per step) hold a stop string."""
        tails = torch.stack(new_tokens[-self._window:], 1)[rows].tolist()
        texts = self._tokenizer.batch_decode(tails, skip_special_tokens=True)
        return [row for row, text in zip(rows, texts) if any(s in text for s in self.strings)]

    def cut(self, text: str) -> str:
        """``text`` up to its first stop string (excluded)."""
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[: min(ends)] if ends else text


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    two_pass: bool = False,
    adapter: bool = True,
    streamer=None,
    adapters: dict | None = None,
    return_log_probs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples continuations from a ``QAdapterModel``'s customised policy; see ``QAdapterModel.generate``."""
    head = model.lm_head
    weight, bias = head.weight, getattr(head, "bias", None)
    mask = _check_prompt(input_ids, attention_mask, weight)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    rows, device = input_ids.shape[0], input_ids.device
    # Validated once: every token then calls the unchecked sampler (no per-token argument checks).
    per_row = check_sampling_parameters(rows, device, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    backend, budget = resolve_backend(None, device), tile_budget(None)
    generator = as_generator(generator, device)  # one generator for all steps: a seed is drawn from once
    stops = _StopStrings(stop_strings, tokenizer) if stop_strings is not None else None
    eos, pad = special_token_ids(model, tokenizer, eos_token_id, pad_token_id)
    if pad is None and stops is not None:
        raise ValueError("pad_token_id is needed to fill rows that stop early, and the model defines none")
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError("streamer must have put(token_ids) and end() methods (transformers' BaseStreamer)")
    for name, flag in (("two_pass", two_pass), ("adapter", adapter), ("return_log_probs", return_log_probs)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    streams_cls = (TwoPassStreams if two_pass else MixedBatchStreams) if adapter else BaseOnlyStreams
    policy = model.qadapter_config.policy.for_adapter(adapter).validated()
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    composed = None
    if adapters is not None:
        if not adapter:
            raise ValueError("adapters= composes adapters; it cannot be combined with adapter=False")
        if return_log_probs:
            raise ValueError("return_log_probs is not supported with adapters= (composed decoding) yet")
        composed = composition(check_adapter_weights(adapters, model.adapter_names), rows, device, policy)
        head_rows = composed.head_sampling(per_row)
        streams_cls = functools.partial(streams_cls, adapter_names=composed.names)
    broken = identity_break(model)
    if broken is not None:
        warnings.warn(f"generate samples from {'each stream' if composed else 'two'} logits rows per token, not one "
                      f"LM-head product on the combined hidden state: {broken}", stacklevel=3)
    mode = "logits" if broken is not None else "heads" if two_pass else "mixed"

    was_training = model.training
    model.eval()  # peft refuses mixed-adapter batches in training mode; dropout off
    try:
        with few_row_linears(model.base_causal_lm), streams_cls(
                model, rows, max_length=input_ids.shape[1] + max_new_tokens, logits=broken is not None) as streams:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            positions = prompt_positions(mask)
            hidden = streams.step(input_ids, mask, positions)
            unfinished = torch.ones(rows, dtype=torch.bool, device=device)
            new_tokens, log_probs = [], []
            for step in range(max_new_tokens):
                if composed is not None:
                    tokens = composed.sample(hidden, weight, bias, per_row, head_rows, generator, backend, budget, mode)
                elif broken is None:  # two_pass keeps the authors' two head products too
                    tokens = sample_hidden_rows(*(h.to(weight.dtype) for h in hidden), weight, bias, policy, per_row,
                                                generator, backend, budget, two_stream=two_pass)
                else:
                    tokens = sample_logits_rows(*hidden, policy, per_row, generator, backend)
                finished_before = ~unfinished
                undrawable = (tokens < 0) & unfinished  # the sampler's -1: no finite maximum in the row
                if pad is not None:
                    tokens = torch.where(unfinished, tokens, pad)
                unfinished &= ~torch.isin(tokens, eos_ids)
                # The token's one host sync: a row that could not be drawn from, and whether any goes on.
                first_undrawable, going_on = torch.stack(
                    [torch.where(undrawable.any(), undrawable.long().argmax(), -1), unfinished.any().long()]).tolist()
                if first_undrawable >= 0:
                    raise ValueError(f"adapter_hidden, base_hidden or lm_head_weight: row {first_undrawable} is all "
                                     f"-inf or holds NaN or +inf")
                new_tokens.append(tokens)
                if return_log_probs:
                    log_probs.append(torch.where(finished_before, 0.0, _policy_log_probs(
                        hidden, tokens, weight, bias, policy, broken is None, backend, budget)))
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if stops is not None:
                    live = unfinished.nonzero().flatten().tolist()
                    unfinished[stops.hits(new_tokens, live)] = False
                    going_on = bool(unfinished.any())
                if step + 1 == max_new_tokens or not going_on:
                    break
                mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
                positions = positions[:, -1:] + 1
                hidden = streams.step(tokens[:, None], mask, positions)
    finally:
        model.train(was_training)
    if streamer is not None:
        streamer.end()
    out = torch.cat([input_ids, torch.stack(new_tokens, 1)], 1)
    return (out, torch.stack(log_probs, 1)) if return_log_probs else out


def _policy_log_probs(hidden, tokens, weight, bias, policy: PolicyParams, identity_holds: bool, backend: str,
                      budget: float) -> torch.Tensor:
    """log pi~(tokens) [B] fp32 of one step: one fused pass over the LM head on the hidden states
    (``combined_log_probs_from_hidden``), or from the two logits rows where the identity breaks."""
    if identity_holds:
        return log_probs_hidden_rows(*(h.to(weight.dtype) for h in hidden), weight, bias, tokens, policy, backend,
                                     budget).float()
    q_logits, base_logits = (h.float() for h in hidden)
    return reference.combined_log_probs(q_logits, base_logits, tokens, policy)


def encode_prompt_as_trained(model, tokenizer, prompt, prompt_format: str | None = None) -> list[int]:
    """The token ids of ``prompt`` written in the prompt format ``model``'s adapter was trained on (its
    config's ``prompt_format``; ``prompt_format`` overrides it), encoded as training encodes prompts."""
    config = getattr(model, "qadapter_config", None)
    trained = prompt_format if prompt_format is not None else getattr(config, "prompt_format", None)
    sha = getattr(config, "chat_template_sha256", None) if prompt_format is None else None
    return encode_prompt(in_trained_format(prompt, tokenizer, trained, sha), tokenizer)


def generate_text(model, tokenizer, prompts: str | Sequence, *, stop_strings: str | Sequence[str] | None = None,
                  skip_special_tokens: bool = True, prompt_format: str | None = None, **kwargs) -> str | list[str]:
    """Strings in, strings out; see ``QAdapterModel.generate_text``."""
    single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise ValueError("prompts must not be empty")
    encoded = [encode_prompt_as_trained(model, tokenizer, p, prompt_format) for p in batch]
    width = max(map(len, encoded))
    device = model.lm_head.weight.device
    # The left padding is masked out, so its id does not matter.
    input_ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    out = generate(model, input_ids, attention_mask, stop_strings=stop_strings, tokenizer=tokenizer, **kwargs)
    texts = tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=skip_special_tokens)
    if stop_strings is not None:
        stops = _StopStrings(stop_strings, tokenizer)
        texts = [stops.cut(t) for t in texts]
    return texts[0] if single else texts
