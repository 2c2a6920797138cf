"""One preference pair and how a row in any of TRL's preference formats becomes one.

TRL's formats (https://huggingface.co/docs/trl/dataset_formats): explicit prompt (``prompt``,
``chosen``, ``rejected``) or implicit prompt (``chosen`` and ``rejected`` only, each holding the whole
dialogue); every field a string or a conversation (a list of ``{"role", "content"}`` messages).
An implicit prompt is split at a turn boundary, never inside a turn (``split_implicit_prompt``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..prompts import HH_ASSISTANT_MARKER, Turns, is_preformatted

__all__ = [
    "FIELDS",
    "PreferenceDataError",
    "PreferenceExample",
    "example_from_row",
    "split_implicit_prompt",
]

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


class PreferenceDataError(ValueError):
    """A bad preference row; the message starts with where it is (``path:line:`` or ``row N:``)."""


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

    @property
    def preformatted(self) -> bool:
        """The prompt is HH-RLHF-style dialogue text (``is_preformatted``)."""
        return is_preformatted(self.prompt)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def split_implicit_prompt(chosen: Turns, rejected: Turns) -> tuple[Turns, Turns, Turns]:
    """``(prompt, chosen, rejected)`` of an implicit-prompt pair, split at a turn boundary.

    Conversations: the prompt is every message before the final assistant turn, which must be the
    same in both. Strings (HH-RLHF's raw text): the prompt ends with the last ``"\\n\\nAssistant:"``
    that both share; each response is the rest, its leading space included. Unlike a character-level
    common prefix (TRL's ``extract_prompt``), no shared first characters of the responses leak into
    the prompt: ``"...Assistant: I am fine"`` vs ``"...Assistant: I hate you"`` gives the prompt
    ``"...Assistant:"``, not ``"...Assistant: I"``. ValueError when there is no such boundary.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = chosen[:_common_prefix_length(chosen, rejected)]
        cut = shared.rfind(HH_ASSISTANT_MARKER)
        if cut < 0:
            raise ValueError(
                f"implicit prompt: 'chosen' and 'rejected' share no {HH_ASSISTANT_MARKER!r} turn marker to split "
                "the prompt at (give a 'prompt' field, or conversations)")
        cut += len(HH_ASSISTANT_MARKER)
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        for field, turns in (("chosen", chosen), ("rejected", rejected)):
            _check_turns(field, turns)
            if turns[-1]["role"] != "assistant":
                raise ValueError(f"implicit prompt: {field!r} must end with an assistant message, "
                                 f"got {turns[-1]['role']!r}")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("implicit prompt: 'chosen' and 'rejected' differ before their final assistant turn")
        if not chosen[:-1]:
            raise ValueError("implicit prompt: 'chosen' holds no message before its final assistant turn")
        return chosen[:-1], chosen[-1:], rejected[-1:]
    raise ValueError("'chosen' and 'rejected' must both be strings or both be message lists")


def example_from_row(row: Any) -> PreferenceExample:
    """The pair a row holds: a ``PreferenceExample``, or a mapping in TRL's explicit- or implicit-prompt
    format (keys besides prompt/chosen/rejected are ignored; a ``prompt`` of None counts as absent).
    ValueError says what is wrong; the caller adds where the row is."""
    if isinstance(row, PreferenceExample):
        return row
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(map(repr, missing))}")
    prompt = row.get("prompt")
    if prompt is None:
        return PreferenceExample(*split_implicit_prompt(row["chosen"], row["rejected"]))
    return PreferenceExample(prompt, row["chosen"], row["rejected"])
