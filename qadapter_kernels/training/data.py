"""Preference data: tokenisation and batching for Q-Adapter training.

Rows come from ``training.sources`` (files, saved or cached datasets, Python objects) in any of
TRL's formats (``training.examples``); ``as_preference_dataset`` turns any of them into a torch
dataset of ``TokenizedPair``. A batch of B pairs becomes 2B rows, chosen rows first,
right-padded, with ``loss_mask`` True exactly on response tokens (docs/DESIGN.md §2): the contract
of ``QAdapterModel.compute_loss``.
"""
from __future__ import annotations

import logging
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..params import SequenceLimits
from ..prompts import (bos_token_id, chat_template_sha256, encode_prompt, encode_prompt_with_bos, prompt_format,
                       render_chat)
from .examples import PreferenceDataError, PreferenceExample
from .sources import PreferenceRowStream, Source, load_preferences, open_preferences

from ..preferences import DEFAULT_PREFERENCE

__all__ = [
    "PreferenceCollator",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferenceExample",
    "PreferenceStream",
    "TokenizedPair",
    "DEFAULT_PROMPT_TRUNCATION",
    "PROMPT_TRUNCATIONS",
    "SHIPPED_SPLITS",
    "as_preference_dataset",
    "encode_prompt",
    "load_preferences",
    "shipped_data_path",
    "tokenize_preference",
    "tokenize_with_report",
]

logger = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# The splits every shipped preference has.
SHIPPED_SPLITS = ("train", "heldout")


def shipped_data_path(split: str = "train", name: str = DEFAULT_PREFERENCE) -> Path:
    """Path of a preference file shipped with the package: ``split`` is one of ``SHIPPED_SPLITS``,
    ``name`` one of ``preferences.PREFERENCE_CHECKERS``."""
    path = _DATA_DIR / name / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped preference data at {path}")
    return path


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: the shared prompt and the two responses (response tokens only)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _chat_tokens(example: PreferenceExample, tokenizer, bos: int | None) -> tuple[list[int], list[int], list[int]]:
    if example.conversational:
        prompt, responses = example.prompt, (example.chosen, example.rejected)
    else:  # plain strings become one user turn and one assistant turn
        prompt = [{"role": "user", "content": example.prompt}]
        responses = ([{"role": "assistant", "content": r}] for r in (example.chosen, example.rejected))
    prompt_ids = encode_prompt_with_bos(prompt, tokenizer, bos)
    out = [prompt_ids]
    for response in responses:
        full = render_chat(tokenizer, [*prompt, *response], False, bos)
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the chat template does not render the prompt (with add_generation_prompt=True) as a "
                "prefix of the whole conversation, so the response tokens cannot be told apart"
            )
        out.append(full[len(prompt_ids):])
    return out[0], out[1], out[2]


def _plain_tokens(example: PreferenceExample, tokenizer, bos: int | None) -> tuple[list[int], list[int], list[int]]:
    if example.conversational:
        raise ValueError("conversational examples need a tokenizer with a chat template")

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = encode_prompt_with_bos(example.prompt, tokenizer, bos)
    # Responses end with EOS so that the model learns where an answer stops.
    return prompt_ids, encode(example.chosen) + eos, encode(example.rejected) + eos


PROMPT_TRUNCATIONS = ("both_ends", "tail")
DEFAULT_PROMPT_TRUNCATION = PROMPT_TRUNCATIONS[0]
# Token budgets of a pair (prompt + response) and of its prompt, unless the caller sets them.
DEFAULT_MAX_LENGTH = SequenceLimits.max_length  # one definition: params.SequenceLimits
DEFAULT_MAX_PROMPT_LENGTH = SequenceLimits.max_prompt_length
# Above this fraction of cut pairs the dataset warns: the data no longer say what the file says.
TRUNCATION_WARNING_FRACTION = 0.1


def _cut_prompt(prompt_ids: list[int], bos: int | None, max_prompt_length: int, how: str) -> list[int]:
    # A BOS the tokenizer always uses stays: the model never saw text without it.
    head = prompt_ids[:1] if bos is not None and prompt_ids[0] == bos else []
    body, keep = prompt_ids[len(head):], max_prompt_length - len(head)
    if how == "tail":
        return head + (body[-keep:] if keep else [])
    # "both_ends": the start (system message, question: what defines the task) and the end (the
    # generation prompt the answer follows); the middle goes.
    start = (keep + 1) // 2
    return head + body[:start] + (body[len(body) - (keep - start):] if keep > start else [])


def _check_limits(max_length: int, max_prompt_length: int, prompt_truncation: str) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if prompt_truncation not in PROMPT_TRUNCATIONS:
        raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {prompt_truncation!r}")


def tokenize_with_report(example: PreferenceExample, tokenizer, max_length: int = DEFAULT_MAX_LENGTH,
                         max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
                         prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION) -> tuple[TokenizedPair | None, frozenset[str]]:
    """``tokenize_preference`` plus what happened to the pair: a set of ``"prompt_cut"``,
    ``"response_cut"``, and for a dropped pair (None) one of ``"identical"`` (chosen equals rejected
    in the data), ``"identical_after_cut"``, ``"empty_after_cut"``."""
    _check_limits(max_length, max_prompt_length, prompt_truncation)
    if example.chosen == example.rejected:
        return None, frozenset({"identical"})
    chat = bool(getattr(tokenizer, "chat_template", None)) and not example.preformatted
    bos = bos_token_id(tokenizer)
    prompt_ids, chosen_ids, rejected_ids = (_chat_tokens if chat else _plain_tokens)(example, tokenizer, bos)
    events = set()
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = _cut_prompt(prompt_ids, bos, max_prompt_length, prompt_truncation)
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
    example: PreferenceExample, tokenizer, max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH, prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION,
) -> TokenizedPair | None:
    """Tokenize one pair; ``None`` when the pair teaches nothing (drop it): chosen equals rejected,
    before or after truncation, or truncation leaves a response empty.

    With a chat template the prompt is rendered with ``add_generation_prompt=True`` and each
    response is the rest of the rendered conversation (its end-of-turn tokens included); without
    one, prompt and responses are encoded separately, a BOS in front when the tokenizer uses one
    and EOS after each response; so is an HH-RLHF-style string (``PreferenceExample.preformatted``),
    whatever the tokenizer: it already holds its dialogue format. A prompt longer than
    ``max_prompt_length`` keeps (behind the BOS, when the tokenizer always starts with one) its
    first and last tokens, half the budget each
    (``prompt_truncation="both_ends"``: the start defines the task, the end is where the answer
    follows), or its last tokens only (``"tail"``). Then each response keeps its first
    ``max_length - len(prompt)`` tokens.
    """
    return tokenize_with_report(example, tokenizer, max_length, max_prompt_length, prompt_truncation)[0]


_DROP_REASONS = {"identical": "chosen equals rejected in the data",
                 "identical_after_cut": "chosen equals rejected after truncation",
                 "empty_after_cut": "a response would be empty after truncation"}


class _TokenColumn:
    """Lists of token ids stored flat (int32) with offsets: no Python object per token or per row."""

    def __init__(self) -> None:
        self.ids, self.offsets = array("i"), array("q", [0])

    def append(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        self.offsets.append(len(self.ids))

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[self.offsets[index]:self.offsets[index + 1]].tolist()


class _TokenizedPairs:
    """What the dataset and the stream share: the source, the limits, tokenizing one pair at a time
    and counting what happened to it. ``_ready()`` runs at the end of construction."""

    def __init__(
        self,
        data: Source,
        tokenizer,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
        prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION,
        *,
        split: str | None = None,
    ) -> None:
        _check_limits(max_length, max_prompt_length, prompt_truncation)
        self.rows = open_preferences(data, split)
        self.tokenizer = tokenizer
        self.limits = (max_length, max_prompt_length, prompt_truncation)
        self.total, self.kept, self.cut = 0, 0, 0
        # The limits the pairs were cut to (part of a cached base pass's key, training.base_cache).
        self.tokenization = {"max_length": max_length, "max_prompt_length": max_prompt_length,
                             "prompt_truncation": prompt_truncation}
        self.counts: dict[str, int] = {}
        # Pairs per prompt format (prompts.PROMPT_FORMATS): what a saved adapter records.
        self.prompt_formats: dict[str, int] = {}
        self._ready()

    def _ready(self) -> None:
        pass

    def _tokenize(self, example: PreferenceExample) -> TokenizedPair | None:
        pair, events = tokenize_with_report(example, self.tokenizer, *self.limits)
        self.total += 1
        form = prompt_format(example.prompt, self.tokenizer)
        self.prompt_formats[form] = self.prompt_formats.get(form, 0) + 1
        for event in events:
            self.counts[event] = self.counts.get(event, 0) + 1
        if pair is not None:
            self.kept += 1
            self.cut += bool(events & {"prompt_cut", "response_cut"})
        return pair

    def prompt_format_record(self) -> dict[str, str | None]:
        """``{"prompt_format", "chat_template_sha256"}`` of the prompts read (so far, for a stream): the
        format most of them had; the hash of the tokenizer's chat template when that format is it."""
        if not self.prompt_formats:
            return {"prompt_format": None, "chat_template_sha256": None}
        form = max(self.prompt_formats, key=self.prompt_formats.get)
        sha = chat_template_sha256(self.tokenizer) if form == "chat_template" else None
        return {"prompt_format": form, "chat_template_sha256": sha}

    def summary(self) -> str:
        """``"kept K of N; dropped ...; cut ..."``: every kind of drop and truncation, with its count
        (for a stream: of the rows read so far in this process)."""
        dropped = [f"{self.counts[k]} ({why})" for k, why in _DROP_REASONS.items() if k in self.counts]
        cut = [f"{self.counts[k]} {what}" for k, what in (("prompt_cut", "prompts"), ("response_cut", "responses"))
               if k in self.counts]
        return (f"kept {self.kept} of {self.total}; dropped {', '.join(dropped) or 'none'}; "
                f"truncated {', '.join(cut) or 'none'}")


class PreferenceDataset(_TokenizedPairs, Dataset):
    """Every pair of a source tokenized once, up front (like TRL's trainers); pairs that teach
    nothing are dropped, and every cut and drop is counted.

    ``data``: anything ``training.sources.open_preferences`` reads (a path, a dataset name, a list
    of rows or PreferenceExample objects, a ``datasets`` object; ``split`` picks a split). Rows are
    read one at a time and the token ids kept in flat int32 arrays, so a large source is never
    held as Python objects. ``total``: pairs read; ``dropped``: pairs dropped; ``counts``: how many
    pairs each event of ``tokenize_with_report`` hit; ``summary()``: one line saying all of it. A
    warning is logged when pairs are dropped or more than ``TRUNCATION_WARNING_FRACTION`` of them
    are cut. Raises ``PreferenceDataError`` naming the first bad row.
    """

    def _ready(self) -> None:
        self._columns = (_TokenColumn(), _TokenColumn(), _TokenColumn())
        for example in self.rows:
            pair = self._tokenize(example)
            if pair is not None:
                for column, ids in zip(self._columns, (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)):
                    column.append(ids)
        self.rows = None  # read once; what stays is plain arrays (picklable for DataLoader workers)
        self.dropped: int = self.total - self.kept
        limits = f"(max_length={self.limits[0]}, max_prompt_length={self.limits[1]})"
        if self.dropped:
            reasons = ", ".join(f"{self.counts[k]} {why}" for k, why in _DROP_REASONS.items() if k in self.counts)
            logger.warning("dropped %d of %d preference pairs: %s %s", self.dropped, self.total, reasons, limits)
        if self.cut > TRUNCATION_WARNING_FRACTION * self.total:
            logger.warning("truncated %d of the %d preference pairs kept %s: raise the limits to keep them whole",
                           self.cut, self.kept, limits)
        if not self.kept:
            raise ValueError(f"no preference pair left out of {self.total} after tokenization")

    def __len__(self) -> int:
        return self.kept

    def __getitem__(self, index: int) -> TokenizedPair:
        if index < 0:
            index += self.kept
        if not 0 <= index < self.kept:
            raise IndexError(f"pair {index} out of range for {self.kept} pairs")
        return TokenizedPair(*(column[index] for column in self._columns))


class PreferenceStream(_TokenizedPairs, IterableDataset):
    """Pairs tokenized as they are read, for a source read once (a ``datasets.IterableDataset``) or
    too large to tokenize up front; pairs that teach nothing are skipped. Same arguments as
    ``PreferenceDataset``.

    Each DataLoader worker tokenizes every ``num_workers``-th row. ``counts`` and ``summary()``
    describe the rows read so far in this process. With the Trainer, give ``max_steps``: a stream
    has no length.
    """

    def __iter__(self) -> Iterator[TokenizedPair]:
        worker = get_worker_info()
        for index, example in enumerate(self.rows):
            if worker is not None and index % worker.num_workers != worker.id:
                continue
            pair = self._tokenize(example)
            if pair is not None:
                yield pair


def as_preference_dataset(
    data: Source | PreferenceDataset | PreferenceStream,
    tokenizer,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_prompt_length: int = DEFAULT_MAX_PROMPT_LENGTH,
    *,
    prompt_truncation: str = DEFAULT_PROMPT_TRUNCATION,
    split: str | None = None,
    streaming: bool = False,
) -> PreferenceDataset | PreferenceStream:
    """Any preference data as a torch dataset of ``TokenizedPair`` (what ``PreferenceCollator`` batches).

    ``data``: a path (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz``, ``.parquet``, ``.csv``, or a
    ``Dataset.save_to_disk`` folder), a dataset name in the local Hugging Face cache, a list of row
    dicts or PreferenceExample objects, a pandas DataFrame, a ``datasets`` ``Dataset`` /
    ``DatasetDict`` (``split``) / ``IterableDataset``, in TRL's explicit- or implicit-prompt format, strings or conversations. A
    ``PreferenceDataset`` or ``PreferenceStream`` is returned as it is. A one-pass source, or
    ``streaming=True``, gives a ``PreferenceStream`` (tokenized as read); anything else a
    ``PreferenceDataset`` (tokenized now). Bad rows raise ``PreferenceDataError`` naming the row.
    """
    if isinstance(data, (PreferenceDataset, PreferenceStream)):
        return data
    rows = open_preferences(data, split)
    if streaming or isinstance(rows, PreferenceRowStream):
        return PreferenceStream(rows, tokenizer, max_length, max_prompt_length, prompt_truncation)
    return PreferenceDataset(rows, tokenizer, max_length, max_prompt_length, prompt_truncation)


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

    @classmethod
    def for_tokenizer(cls, tokenizer, pad_to: int | None = None) -> "PreferenceCollator":
        """A collator padding with the tokenizer's pad token, else its EOS (padding is masked out)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: give PreferenceCollator a pad_token_id")
        return cls(pad, pad_to)

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
