"""The preferences the package ships data for, each with the checker that decides it exactly.

The data generator (``app/make_preferences.py``), the demo and the evaluation tasks all score a
response with these, so a preference has one definition.
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["PREFERENCE_CHECKERS", "satisfies_lowercase"]


def satisfies_lowercase(text: str) -> bool:
    """True when ``text`` has letters and none of them is upper case."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


# A preference's name (the folder under data/, the task records' field) -> True when a response satisfies it.
PREFERENCE_CHECKERS: dict[str, Callable[[str], bool]] = {"lowercase": satisfies_lowercase}
