"""The preferences the package ships data for, each with the checker that decides it exactly.

The data generator (``app/make_preferences.py``), the demo and the evaluation tasks all score a
response with these, so a preference has one definition.
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["CONCISE_MAX_WORDS", "DEFAULT_PREFERENCE", "PREFERENCE_CHECKERS", "PREFERENCE_RULES", "SIGNOFF", "satisfies_concise", "satisfies_lowercase",
           "satisfies_signoff", "word_count"]

# The closing line the ``signoff`` preference asks for, on its own line at the end of an answer.
SIGNOFF = "Have a great day!"

# The most words a ``concise`` answer may have: every shipped core fact fits in one sentence of at
# most this many words, while SmolLM2-135M-Instruct's own answers mostly run longer.
CONCISE_MAX_WORDS = 24


def word_count(text: str) -> int:
    """Words as separated by white space."""
    return len(text.split())


def satisfies_lowercase(text: str) -> bool:
    """True when ``text`` has letters and none of them is upper case."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


def satisfies_signoff(text: str) -> bool:
    """True when ``text``, stripped, ends with ``SIGNOFF`` exactly (case-sensitive)."""
    return text.strip().endswith(SIGNOFF)


def satisfies_concise(text: str) -> bool:
    """True when ``text`` has at least one word and at most ``CONCISE_MAX_WORDS``."""
    return 0 < word_count(text) <= CONCISE_MAX_WORDS


# A preference's name (the folder under data/, the task records' field) -> True when a response satisfies it.
PREFERENCE_CHECKERS: dict[str, Callable[[str], bool]] = {
    "lowercase": satisfies_lowercase, "signoff": satisfies_signoff, "concise": satisfies_concise,
}

# A preference's rule in a few words, for people reading a report.
PREFERENCE_RULES: dict[str, str] = {
    "lowercase": "letters, none upper case", "signoff": f"ends with {SIGNOFF!r}",
    "concise": f"1 to {CONCISE_MAX_WORDS} words",
}

# The preference a command, task or benchmark uses when none is named.
DEFAULT_PREFERENCE = "lowercase"
