"""Preference data: loading, tokenisation and batching for Q-Adapter training.

Data are JSON Lines in the TRL convention: each line holds ``prompt``, ``chosen`` and ``rejected``,
either all strings or all lists of chat messages ``{"role", "content"}`` (then ``prompt`` is the
conversation before the answer and ``chosen``/``rejected`` hold the assistant message(s)).

A batch of B pairs becomes 2B rows, chosen rows first, right-padded, with ``loss_mask`` True
exactly on response tokens (docs/DESIGN.md §2): the contract of ``QAdapterModel.compute_loss``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch.utils.data import Dataset

from ..preferences import DEFAULT_PREFERENCE

__all__ = [
    "PreferenceCollator",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferenceExample",
    "TokenizedPair",
    "PROMPT_TRUNCATIONS",
    "SHIPPED_SPLITS",
    "encode_prompt",
    "load_preferences",
    "shipped_data_path",
    "tokenize_preference",
    "tokenize_with_report",
]

logger = logging.getLogger(__name__)

Message = dict[str, str]
Turns = Union[str, list[Message]]

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")
_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# The splits every shipped preference has.
SHIPPED_SPLITS = ("train", "heldout")


class PreferenceDataError(ValueError):
    """A preference file holds a bad line; the message starts with ``path:line_number:``."""


def shipped_data_path(split: str = "train", name: str = DEFAULT_PREFERENCE) -> Path:
    """Path of a preference file shipped with the package: ``split`` is one of ``SHIPPED_SPLITS``,
    ``name`` one of ``preferences.PREFERENCE_CHECKERS``."""
    path = _DATA_DIR / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped preference data at {path}")
    return path


def _check_turns(field: str, value: Any) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{field!r} is an empty string")
        return
    if not isinstance(value, list):
        raise ValueError(f"{field!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{field!r} is an empty list of messages")
    for i, message in enumerate(value):
        where = f"{field!r}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a message object, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where} has no {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"{where}[{key!r}] must be a string, got {type(message[key]).__name__}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}['role'] must be one of {', '.join(ROLES)}, got {message['role']!r}")
        if not message["content"].strip():
            raise ValueError(f"{where}['content'] is an empty string")


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair; constructing it validates the fields (``ValueError`` says what is wrong)."""

    prompt: Turns
    chosen: Turns
    rejected: Turns

    def __post_init__(self) -> None:
        for field in FIELDS:
            _check_turns(field, getattr(self, field))
        kinds = {isinstance(getattr(self, field), str) for field in FIELDS}
        if len(kinds) != 1:
            raise ValueError("'prompt', 'chosen' and 'rejected' must all be strings or all be message lists")
        if self.conversational:
            if self.prompt[-1]["role"] != "user":
                raise ValueError(f"'prompt' must end with a user message, got {self.prompt[-1]['role']!r}")
            for field in ("chosen", "rejected"):
                for i, message in enumerate(getattr(self, field)):
                    if message["role"] != "assistant":
                        raise ValueError(f"{field!r}[{i}] must be an assistant message, got {message['role']!r}")

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def load_preferences(path: str | os.PathLike) -> list[PreferenceExample]:
    """Read a JSON Lines preference file, validating every line.

    Blank lines are skipped; keys besides prompt/chosen/rejected are ignored. Raises
    ``PreferenceDataError`` (``"path:line: what is wrong"``) on a bad line or a file without
    examples, ``FileNotFoundError`` when the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            def fail(what: str) -> PreferenceDataError:
                return PreferenceDataError(f"{path}:{number}: {what}")

            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise fail(f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise fail(f"expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in FIELDS if k not in obj]
            if missing:
                raise fail(f"missing key(s) {', '.join(map(repr, missing))}")
            try:
                examples.append(PreferenceExample(*(obj[k] for k in FIELDS)))
            except ValueError as e:
                raise fail(str(e)) from None
    if not examples:
        raise PreferenceDataError(f"{path}: no preference examples (the file is empty)")
    return examples


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: the shared prompt and the two responses (response tokens only)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of a plain text it encodes."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and bool(ids) and ids[0] == bos


def _with_one_bos(ids: list[int], tokenizer) -> list[int]:
    if _adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id, *ids]
    return ids


def _render(tokenizer, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes its own special tokens (BOS included, when it has one): encoding with
    # add_special_tokens=True would add a second BOS, the authors' pitfall. A template without
    # BOS for a tokenizer that uses one gets exactly one.
    return _with_one_bos(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer)


def encode_prompt(prompt: Turns, tokenizer) -> list[int]:
    """The token ids of a prompt exactly as training sees it before a response.

    With a chat template: the conversation (a plain string becomes one user turn) rendered with
    ``add_generation_prompt=True``, one BOS. Without: the text with one BOS when the tokenizer
    uses one. Generation feeds these ids, so the adapter decodes from the states it was trained on.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _render(tokenizer, messages, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return _with_one_bos(tokenizer(prompt, add_special_tokens=False)["input_ids"], tokenizer)


def _chat_tokens(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    if example.conversational:
        prompt, responses = example.prompt, (example.chosen, example.rejected)
    else:  # plain strings become one user turn and one assistant turn
        prompt = [{"role": "user", "content": example.prompt}]
        responses = ([{"role": "assistant", "content": r}] for r in (example.chosen, example.rejected))
    prompt_ids = encode_prompt(prompt, tokenizer)
    out = [prompt_ids]
    for response in responses:
        full = _render(tokenizer, [*prompt, *response], add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the chat template does not render the prompt (with add_generation_prompt=True) as a "
                "prefix of the whole conversation, so the response tokens cannot be told apart"
            )
        out.append(full[len(prompt_ids):])
    return out[0], out[1], out[2]


def _plain_tokens(example: PreferenceExample, tokenizer) -> tuple[list[int], list[int], list[int]]:
    if example.conversational:
        raise ValueError("conversational examples need a tokenizer with a chat template")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = encode_prompt(example.prompt, tokenizer)
    # Responses end with EOS so that the model learns where an answer stops.
    return prompt_ids, encode(example.chosen) + eos, encode(example.rejected) + eos


PROMPT_TRUNCATIONS = ("both_ends", "tail")
# Above this fraction of cut pairs the dataset warns: the data no longer say what the file says.
TRUNCATION_WARNING_FRACTION = 0.1


def _cut_prompt(prompt_ids: list[int], tokenizer, max_prompt_length: int, how: str) -> list[int]:
    # A BOS the tokenizer always uses stays: the model never saw text without it.
    head = prompt_ids[:1] if _adds_bos(tokenizer) and prompt_ids[0] == tokenizer.bos_token_id else []
    body, keep = prompt_ids[len(head):], max_prompt_length - len(head)
    if how == "tail":
        return head + (body[-keep:] if keep else [])
    # "both_ends": the start (system message, question: what defines the task) and the end (the
    # generation prompt the answer follows); the middle goes.
    start = (keep + 1) // 2
    return head + body[:start] + (body[len(body) - (keep - start):] if keep > start else [])


def tokenize_with_report(example: PreferenceExample, tokenizer, max_length: int = 512, max_prompt_length: int = 256,
                         prompt_truncation: str = "both_ends") -> tuple[TokenizedPair | None, frozenset[str]]:
    """``tokenize_preference`` plus what happened to the pair: a set of ``"prompt_cut"``,
    ``"response_cut"``, and for a dropped pair (None) one of ``"identical"`` (chosen equals rejected
    in the data), ``"identical_after_cut"``, ``"empty_after_cut"``."""
    if max_length < 1 or max_prompt_length < 1:
        raise ValueError(f"max_length and max_prompt_length must be >= 1, got {max_length}, {max_prompt_length}")
    if prompt_truncation not in PROMPT_TRUNCATIONS:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {prompt_truncation!r}")
    if example.chosen == example.rejected:
        return None, frozenset({"identical"})
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids, chosen_ids, rejected_ids = (_chat_tokens if chat else _plain_tokens)(example, tokenizer)
    events = set()
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = _cut_prompt(prompt_ids, tokenizer, max_prompt_length, prompt_truncation)
        events.add("prompt_cut")
    budget = max(max_length - len(prompt_ids), 0)
    if len(chosen_ids) > budget or len(rejected_ids) > budget:
        events.add("response_cut")
    chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    if not chosen_ids or not rejected_ids:
        return None, frozenset(events | {"empty_after_cut"})
    if chosen_ids == rejected_ids:
        return None, frozenset(events | {"identical_after_cut"})
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids), frozenset(events)


def tokenize_preference(
    example: PreferenceExample, tokenizer, max_length: int = 512, max_prompt_length: int = 256,
    prompt_truncation: str = "both_ends",
) -> TokenizedPair | None:
    """Tokenize one pair; ``None`` when the pair teaches nothing (drop it): chosen equals rejected,
    before or after truncation, or truncation leaves a response empty.

    With a chat template the prompt is rendered with ``add_generation_prompt=True`` and each
    response is the rest of the rendered conversation (its end-of-turn tokens included); without
    one, prompt and responses are encoded separately, a BOS in front when the tokenizer uses one
    and EOS after each response. A prompt longer than ``max_prompt_length`` keeps (behind the BOS,
    when the tokenizer always starts with one) its first and last tokens, half the budget each
    (``prompt_truncation="both_ends"``: the start defines the task, the end is where the answer
    follows), or its last tokens only (``"tail"``). Then each response keeps its first
    ``max_length - len(prompt)`` tokens.
    """
    return tokenize_with_report(example, tokenizer, max_length, max_prompt_length, prompt_truncation)[0]


_DROP_REASONS = {"identical": "chosen equals rejected in the data",
                 "identical_after_cut": "chosen equals rejected after truncation",
                 "empty_after_cut": "a response would be empty after truncation"}


class PreferenceDataset(Dataset):
    """Pairs tokenized eagerly; pairs that teach nothing are dropped, and every cut and drop is counted.

    ``dropped``: pairs dropped; ``counts``: how many pairs each event of ``tokenize_with_report``
    hit; ``summary()``: one line saying all of it. A warning is logged when pairs are dropped or
    more than ``TRUNCATION_WARNING_FRACTION`` of them are cut.
    """

    def __init__(
        self,
        examples: Sequence[PreferenceExample],
        tokenizer,
        max_length: int = 512,
        max_prompt_length: int = 256,
        prompt_truncation: str = "both_ends",
    ) -> None:
        reports = [tokenize_with_report(e, tokenizer, max_length, max_prompt_length, prompt_truncation)
                   for e in examples]
        self.pairs: list[TokenizedPair] = [p for p, _ in reports if p is not None]
        self.total: int = len(reports)
        self.dropped: int = self.total - len(self.pairs)
        self.counts: dict[str, int] = {}
        for _, events in reports:
            for event in events:
                self.counts[event] = self.counts.get(event, 0) + 1
        limits = f"(max_length={max_length}, max_prompt_length={max_prompt_length})"
        if self.dropped:
            reasons = ", ".join(f"{self.counts[k]} {why}" for k, why in _DROP_REASONS.items() if k in self.counts)
            logger.warning("dropped %d of %d preference pairs: %s %s", self.dropped, self.total, reasons, limits)
        cut = sum(1 for pair, events in reports if pair is not None and events & {"prompt_cut", "response_cut"})
        if cut > TRUNCATION_WARNING_FRACTION * self.total:
            logger.warning("truncated %d of the %d preference pairs kept %s: raise the limits to keep them whole",
                           cut, len(self.pairs), limits)
        if not self.pairs:
            raise ValueError(f"no preference pair left out of {self.total} after tokenization")

    def summary(self) -> str:
        """``"kept K of N; dropped ...; cut ..."``: every kind of drop and truncation, with its count."""
        dropped = [f"{self.counts[k]} ({why})" for k, why in _DROP_REASONS.items() if k in self.counts]
        cut = [f"{self.counts[k]} {what}" for k, what in (("prompt_cut", "prompts"), ("response_cut", "responses"))
               if k in self.counts]
        return (f"kept {len(self.pairs)} of {self.total}; dropped {', '.join(dropped) or 'none'}; "
                f"truncated {', '.join(cut) or 'none'}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]


class PreferenceCollator:
    """Batches B pairs as 2B right-padded rows: prompt+chosen rows first, then prompt+rejected.

    Returns ``input_ids`` and ``attention_mask`` (int64, [2B, T]) and ``loss_mask`` (bool,
    [2B, T], True exactly at response tokens), T being the longest row, or ``pad_to`` when given: a
    fixed width makes every pair's padding, and so any rule that reads it, independent of its batch.
    """

    def __init__(self, pad_token_id: int, pad_to: int | None = None) -> None:
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        if pad_to is not None and (not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 2):
            raise ValueError(f"pad_to must be None or an int >= 2, got {pad_to!r}")
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        width = max(len(prompt) + len(response) for prompt, response in rows)
        if self.pad_to is not None:
            if width > self.pad_to:
                raise ValueError(f"a pair holds {width} tokens, more than pad_to = {self.pad_to}")
            width = self.pad_to
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (prompt, response) in enumerate(rows):
            n = len(prompt) + len(response)
            input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[i, :n] = 1
            loss_mask[i, len(prompt):n] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
