"""The forgetting benchmark's measurements of one policy (a ``PolicyScorer``), without lm-eval.

- ``retention_accuracy``: the shipped retention probe, scored as its lm-eval task scores it
  (same prompt, same context/continuation split, case variants summed).
- ``preference_satisfaction``: greedy answers to prompts (encoded as training encodes them),
  scored by the preference's checker.
- ``pair_accuracy``: how often the policy gives the chosen response a higher log-likelihood than
  the rejected one: a property of the policy, so Q-Adapter, SFT and DPO are measured alike.
- ``mean_token_kl``: KL(reference || policy) per token along given responses (the base model's own
  answers to out-of-domain prompts): how far the policy moved where it was not asked to;
  ``token_kl_per_pair`` the same per response, optionally over merged tokens (``case_folded_token_classes``:
  a KL that a lower-case preference does not inflate).
- ``retention_scores``: per probe item, right or not and the margin of the right option over the best
  wrong one; ``open_answer_correct``: the probe's questions answered greedily in chat form.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..prompts import encode_prompt
from ..training.data import PreferenceExample, tokenize_preference
from .checkers import PREFERENCE_CHECKERS, names_only_the_right_option, option_margin, \
    predicted_options, retention_choices
from .policy_scoring import PolicyScorer

__all__ = ["RETENTION_PROMPT", "base_answers", "case_folded_token_classes", "evenly_spaced", "mean_token_kl",
           "open_answer_correct", "pair_accuracy", "preference_satisfaction", "retention_accuracy",
           "retention_correct", "retention_pairs", "retention_scores", "token_kl_per_pair"]

# The doc_to_text of tasks/qadapter_retention.yaml; lm-eval joins it to a choice with one space.
RETENTION_PROMPT = "Question: {question}\nAnswer:"


def retention_pairs(tokenizer, items: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of every choice of every item, split as lm-eval splits them."""
    pairs = []
    for item in items:
        context = RETENTION_PROMPT.format(question=item["question"])
        context_ids = tokenizer.encode(context)
        for choice in retention_choices(item):
            whole = tokenizer.encode(f"{context} {choice}")
            pairs.append((context_ids, whole[len(context_ids):]))
    return pairs


def evenly_spaced(records: Sequence, n: int | None) -> list:
    """``n`` records evenly spaced through ``records`` (so every category of a sorted file), or all for None."""
    if n is None or n >= len(records):
        return list(records)
    return [records[i * len(records) // n] for i in range(n)]


def retention_scores(scorer: PolicyScorer, items: Sequence[dict]) -> list[tuple[bool, float]]:
    """Per item: (whether its right option is picked on content (``checkers.predicted_options``; chance 1/4),
    the log-likelihood margin of the right option over the best wrong one (``checkers.option_margin``))."""
    loglikelihoods = [ll for ll, _ in scorer.continuation_logprobs(retention_pairs(scorer.tokenizer, items))]
    scores, offset = [], 0
    for item in items:
        n = len(retention_choices(item))
        own = loglikelihoods[offset:offset + n]
        scores.append((predicted_options(item, own)[0] == item["target"], option_margin(item, own)))
        offset += n
    return scores


def retention_correct(scorer: PolicyScorer, items: Sequence[dict]) -> list[bool]:
    """Per item, whether its right option is picked on content (``retention_scores``)."""
    return [correct for correct, _ in retention_scores(scorer, items)]


def open_answer_correct(scorer: PolicyScorer, items: Sequence[dict], max_new_tokens: int = 24) -> list[bool]:
    """Per probe item: its question asked as a chat prompt, answered greedily, right iff the answer names
    the right option and no other (``checkers.names_only_the_right_option``)."""
    prompts = [encode_prompt(item["question"], scorer.tokenizer) for item in items]
    answers = scorer.greedy(prompts, max_new_tokens=max_new_tokens)
    return [names_only_the_right_option(item, answer) for item, answer in zip(items, answers)]


def retention_accuracy(scorer: PolicyScorer, items: Sequence[dict]) -> float:
    """Fraction of ``items`` whose right option is picked on content (``retention_correct``)."""
    return sum(retention_correct(scorer, items)) / len(items)


def preference_satisfaction(scorer: PolicyScorer, records: Sequence[dict], max_new_tokens: int = 48,
                            ) -> tuple[float, list[str]]:
    """(fraction of greedy answers that satisfy each record's preference, the answers)."""
    prompts = [encode_prompt(r["prompt"], scorer.tokenizer) for r in records]
    answers = scorer.greedy(prompts, max_new_tokens=max_new_tokens)
    satisfied = [PREFERENCE_CHECKERS[r["preference"]](a) for r, a in zip(records, answers)]
    return sum(satisfied) / len(records), answers


def pair_accuracy(scorer: PolicyScorer, examples: Sequence[PreferenceExample], max_length: int = 512) -> float:
    """Fraction of pairs with log pi(chosen | prompt) > log pi(rejected | prompt)."""
    pairs = [tokenize_preference(e, scorer.tokenizer, max_length=max_length) for e in examples]
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        raise ValueError("no pair survives tokenization")
    scored = scorer.continuation_logprobs(
        [(p.prompt_ids, ids) for p in pairs for ids in (p.chosen_ids, p.rejected_ids)])
    return sum(scored[2 * i][0] > scored[2 * i + 1][0] for i in range(len(pairs))) / len(pairs)


def base_answers(base: PolicyScorer, prompts: Sequence[str],
                 max_new_tokens: int = 32) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base model's greedy answer ids) for each prompt; empty answers are dropped."""
    prompt_ids = [encode_prompt(p, base.tokenizer) for p in prompts]
    answers = base.greedy(prompt_ids, max_new_tokens=max_new_tokens)
    out = []
    for ids, text in zip(prompt_ids, answers):
        answer_ids = base.tokenizer.encode(text, add_special_tokens=False)
        if answer_ids:
            out.append((ids, answer_ids))
    return out


def mean_token_kl(reference: PolicyScorer, scorer: PolicyScorer, pairs: Sequence[tuple[list[int], list[int]]]) -> float:
    """KL(reference || policy) at each continuation token, averaged over all of them (nats per token)."""
    per_pair = token_kl_per_pair(reference, scorer, pairs)
    return sum(total for total, _ in per_pair) / sum(count for _, count in per_pair)


def token_kl_per_pair(reference: PolicyScorer, scorer: PolicyScorer, pairs: Sequence[tuple[list[int], list[int]]],
                      token_classes: torch.Tensor | None = None) -> list[tuple[float, int]]:
    """Per pair: (KL(reference || policy) summed over its continuation tokens, how many tokens).

    ``token_classes``: a class id per vocabulary entry; the distributions are then compared over the
    classes (each class's probabilities summed), so moving mass within a class costs nothing.
    """
    out = []
    for ref, pol in zip(reference.continuation_distributions(pairs), scorer.continuation_distributions(pairs)):
        if token_classes is not None:
            ref, pol = _merged_log_probs(ref, token_classes), _merged_log_probs(pol, token_classes)
        kl = torch.nn.functional.kl_div(pol, ref, log_target=True, reduction="none").sum(-1)
        out.append((float(kl.sum()), kl.numel()))
    return out


def _merged_log_probs(log_probs: torch.Tensor, token_classes: torch.Tensor) -> torch.Tensor:
    n_classes = int(token_classes.max()) + 1
    merged = torch.zeros(log_probs.shape[0], n_classes, dtype=torch.float64, device=log_probs.device)
    merged.index_add_(1, token_classes.to(log_probs.device), log_probs.double().exp())
    return merged.clamp_min(1e-300).log()


def case_folded_token_classes(tokenizer, vocab_size: int) -> torch.Tensor:
    """A class id per token id: tokens whose text is the same in lower case share one ("The", "the", "THE").

    ``vocab_size``: the model's (it may exceed the tokenizer's; extra ids get classes of their own).
    """
    classes: dict[str, int] = {}
    ids = []
    special = set(tokenizer.all_special_ids)  # a property that is rebuilt on every access
    for token_id in range(vocab_size):
        text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else f"<unused {token_id}>"
        # Special tokens decode to their own names and stay apart from plain text.
        key = text if token_id in special else text.lower()
        ids.append(classes.setdefault(key, len(classes)))
    return torch.tensor(ids, dtype=torch.long)
