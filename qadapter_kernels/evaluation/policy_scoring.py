"""Log-likelihoods and greedy answers of a Q-Adapter's customised policy (or of its base model alone).

The customised policy is ``softmax((Q + alpha_0 * log_softmax(L)) / alpha_tilde)`` with
``Q = W h_q + b`` (adapter on) and ``L = W h_b + b`` (adapter off). By the logit identity
(DESIGN.md §2b) its log-probabilities are ``log_softmax(W h_c + b')`` with
``h_c = (h_q + alpha_0 h_b) / alpha_tilde``: one forward over a mixed batch (adapter rows and
peft ``"__base__"`` rows) gives both hidden states, and ONE head product over the scored
positions only gives the log-probabilities; neither stream's logits tensor is built.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from ..decoding.streams import BASE_ADAPTER_NAME, adapter_off, mixed_batch_hooks

__all__ = ["PolicyScorer"]


class PolicyScorer:
    """Scores token sequences under a ``QAdapterModel``'s customised policy.

    ``adapter=False`` scores the base model alone (adapter off: ``alpha_0 = 0``, ``alpha_tilde = 1``,
    ``Q = L``), so a base-only baseline goes through the same code. ``batch_size`` rows are scored
    per forward; ``max_length`` caps a sequence (the context is cut on the left).
    """

    def __init__(self, model, tokenizer, *, adapter: bool = True, batch_size: int = 8, max_length: int = 2048):
        if not isinstance(adapter, bool):
            raise TypeError(f"adapter must be a bool, got {type(adapter).__name__}")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model, self.tokenizer = model, tokenizer
        self.adapter, self.batch_size, self.max_length = adapter, batch_size, max_length
        self.policy = model.qadapter_config.policy.for_adapter(adapter)

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # ------------------------------------------------------------------ log-likelihoods

    @torch.no_grad()
    def continuation_logprobs(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """``(sum of log pi~(continuation | context), whether greedy decoding gives the continuation)`` per pair.

        ``pairs``: ``(context ids, continuation ids)``, both non-empty.
        """
        out = []
        for logprobs, targets in self._continuation_batches(pairs):
            taken = logprobs.gather(1, targets[:, None]).squeeze(1)
            out.append((float(taken.sum()), bool((logprobs.argmax(1) == targets).all())))
        return self._in_input_order(pairs, out)

    @torch.no_grad()
    def continuation_distributions(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[torch.Tensor]:
        """Per pair, ``log pi~`` over the vocabulary at each continuation token: ``[n_continuation, V]`` fp32."""
        return self._in_input_order(pairs, [logprobs for logprobs, _ in self._continuation_batches(pairs)])

    def _order(self, pairs) -> list[int]:
        for i, (context, continuation) in enumerate(pairs):
            if len(context) == 0 or len(continuation) == 0:
                raise ValueError(f"pairs[{i}] needs a non-empty context and continuation")
        # Longest first: a batch holds sequences of similar length, and the first batch shows an out-of-memory early.
        return sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))

    def _in_input_order(self, pairs, results: list) -> list:
        out = [None] * len(pairs)
        for i, result in zip(self._order(pairs), results):
            out[i] = result
        return out

    def _continuation_batches(self, pairs):
        """Yields ``(log pi~ [n, V], continuation ids [n])`` per pair in ``_order``, ``batch_size`` per forward."""
        order = self._order(pairs)
        for start in range(0, len(order), self.batch_size):
            yield from self._score_batch([pairs[i] for i in order[start:start + self.batch_size]])

    def _score_batch(self, pairs):
        rows, spans = [], []
        for context, continuation in pairs:
            # The last token is only ever a target; at most max_length tokens are fed.
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            n_cont = min(len(continuation), len(tokens) - 1)
            rows.append(tokens[:-1])
            spans.append((len(tokens) - 1 - n_cont, n_cont, tokens[-n_cont:]))
        width = max(map(len, rows))
        input_ids = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros_like(input_ids)
        for r, row in enumerate(rows):  # right padding: the scored positions keep their real position ids
            input_ids[r, :len(row)] = torch.tensor(row)
            attention_mask[r, :len(row)] = 1
        adapter_hidden, base_hidden = self._final_hidden_both(input_ids, attention_mask)
        positions = torch.tensor([p for start, n, _ in spans for p in range(start, start + n)], device=self.device)
        row_index = torch.tensor([r for r, (_, n, _) in enumerate(spans) for _ in range(n)], device=self.device)
        logprobs = self._policy_logprobs(adapter_hidden[row_index, positions], base_hidden[row_index, positions])
        offset = 0
        for _, n, tokens in spans:
            yield logprobs[offset:offset + n], torch.tensor(tokens, device=self.device)
            offset += n

    def _final_hidden_both(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's final hidden states with the adapter on and off, from ONE forward."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            if not self.adapter:
                with adapter_off(model.peft_model):
                    hidden = model.final_hidden_states(input_ids, attention_mask)
                return hidden, hidden
            rows = input_ids.shape[0]
            names = [model.peft_model.active_adapter] * rows + [BASE_ADAPTER_NAME] * rows
            with self._mixed_batch(names):
                hidden = model.final_hidden_states(torch.cat([input_ids, input_ids]),
                                                   torch.cat([attention_mask, attention_mask]))
            return hidden[:rows], hidden[rows:]
        finally:
            model.train(was_training)

    def _mixed_batch(self, names: list[str]) -> contextlib.AbstractContextManager:
        # peft's hook that routes each row through its own adapter, checked as generate checks it.
        return mixed_batch_hooks(self.model.peft_model, names)

    def _policy_logprobs(self, adapter_hidden: torch.Tensor, base_hidden: torch.Tensor) -> torch.Tensor:
        """``log pi~`` [N, V] in fp32 from ``h_c`` and one head product (the row constant cancels in log_softmax)."""
        head = self.model.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        hidden = self.policy.combined_hidden(adapter_hidden.float(), base_hidden.float())
        shifted_bias = None if bias is None else self.policy.combined_bias(bias.float())
        return torch.log_softmax(torch.nn.functional.linear(hidden, weight.float(), shifted_bias), dim=-1)

    # ------------------------------------------------------------------ greedy answers

    def greedy(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy continuations (text, cut before the first stop string) of token-id prompts.

        Decoding is ``QAdapterModel.generate`` at temperature 0: the fused combined-policy sampler.
        """
        texts: list[str] = []
        stops = list(stop_strings) or None
        for start in range(0, len(prompts), self.batch_size):
            batch = [list(p)[-self.max_length:] for p in prompts[start:start + self.batch_size]]
            width = max(map(len, batch))
            input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
            out = self.model.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=0.0,
                                      stop_strings=stops, tokenizer=self.tokenizer, adapter=self.adapter)
            for text in self.tokenizer.batch_decode(out[:, width:].tolist(), skip_special_tokens=True):
                ends = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
                texts.append(text[:min(ends)] if ends else text)
        return texts
