"""How the shipped tasks are scored: retention on content (case ignored), preferences by their own checker.

Used by the lm-eval task files (``tasks/utils.py`` re-exports these) and by the forgetting
benchmark, so both score the same way.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ..preferences import PREFERENCE_CHECKERS

# Where the shipped task data lives (written by ``python3 -m qadapter_kernels.app.make_tasks``).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RETENTION_FILE = "qadapter_retention.jsonl"

__all__ = ["RETENTION_FILE", "TASKS_DIR", "CASE_STYLES", "PREFERENCE_CHECKERS", "case_variants", "names_only_the_right_option",
           "option_margin", "predicted_options",
           "preference_process_results", "preference_task", "read_task_records", "retention_choices",
           "retention_process_results"]


def preference_task(preference: str) -> str:
    """The lm-eval task name of a shipped preference's satisfaction task (its files: ``<name>.{yaml,jsonl}``)."""
    if preference not in PREFERENCE_CHECKERS:
        raise ValueError(f"preference must be one of {sorted(PREFERENCE_CHECKERS)}, got {preference!r}")
    return f"qadapter_pref_{preference}"


def read_task_records(name: str, preference: str = "lowercase") -> list[dict]:
    """The records of a shipped task: ``"retention"``, or ``"preference"`` (the satisfaction task of ``preference``)."""
    files = {"retention": RETENTION_FILE, "preference": f"{preference_task(preference)}.jsonl"}
    if name not in files:
        raise ValueError(f"task must be one of {sorted(files)}, got {name!r}")
    lines = (Path(TASKS_DIR) / files[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# The case styles an option is scored in: as written (first) and lower case. A capitalised style is
# left out on purpose: after "Answer:" a model puts much mass on capitalised words, and in that
# style a wrong form ("Goed") can beat a right one the model knows as written ("went").
CASE_STYLES: tuple[Callable[[str], str], ...] = (str, str.lower)


def case_variants(text: str) -> list[str]:
    """``text`` in every case style, duplicates dropped, order kept."""
    return list(dict.fromkeys(style(text) for style in CASE_STYLES))


def retention_choices(doc: dict) -> list[str]:
    """Every case variant of every option, option by option: what is scored."""
    return [variant for option in doc["options"] for variant in case_variants(option)]


def predicted_options(doc: dict, loglikelihoods: Sequence[float]) -> tuple[int, int]:
    """(the option picked on content, the option picked as written) from one log-likelihood per choice.

    On content: the options are compared within one case style, the style whose options are the most
    probable together (the model's own style); so a model that now writes in lower case is judged on
    its lower-case options, and a wrong option never wins by being a common word in another case.
    """
    per_style = _per_style_scores(doc, loglikelihoods)
    return _argmax(max(per_style, key=_logsumexp)), _argmax(per_style[0])


def option_margin(doc: dict, loglikelihoods: Sequence[float]) -> float:
    """The right option's log-likelihood minus the best wrong option's, in the model's own case style
    (the style ``predicted_options`` judges on): positive when the item is right, and by how much."""
    own_style = max(_per_style_scores(doc, loglikelihoods), key=_logsumexp)
    wrong = [score for i, score in enumerate(own_style) if i != doc["target"]]
    return own_style[doc["target"]] - max(wrong)


def _per_style_scores(doc: dict, loglikelihoods: Sequence[float]) -> list[list[float]]:
    """Per case style, one log-likelihood per option (in the options' order)."""
    lookup, offset = [], 0
    for option in doc["options"]:
        variants = case_variants(option)
        lookup.append(dict(zip(variants, loglikelihoods[offset:offset + len(variants)])))
        offset += len(variants)
    if offset != len(loglikelihoods):
        raise ValueError(f"expected {offset} log-likelihoods for {doc['question']!r}, got {len(loglikelihoods)}")
    return [[scores[style(option)] for option, scores in zip(doc["options"], lookup)] for style in CASE_STYLES]


def names_only_the_right_option(doc: dict, answer: str) -> bool:
    """An open (generated) answer is right iff it names the right option and no other one.

    An option is found as a whole word, case ignored (a lower-case answer names "Fe" as "fe"); so a
    one-letter symbol such as "I" is also found as the pronoun. The base model and every policy are
    scored by the same rule, and the study compares them item by item.
    """
    named = [bool(re.search(rf"(?<![\w]){re.escape(option)}(?![\w])", answer, flags=re.IGNORECASE))
             for option in doc["options"]]
    return named[doc["target"]] and sum(named) == 1


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def retention_process_results(doc: dict, results) -> dict[str, float]:
    """lm-eval's per-document metrics: ``acc`` (on content, any case) and ``acc_cased`` (options as written)."""
    loglikelihoods = [r[0] if isinstance(r, (tuple, list)) else r for r in results]
    on_content, as_written = predicted_options(doc, loglikelihoods)
    return {"acc": float(on_content == doc["target"]), "acc_cased": float(as_written == doc["target"])}


def preference_process_results(doc: dict, results) -> dict[str, float]:
    """lm-eval's per-document metric ``satisfied``: the greedy answer passes the preference's checker."""
    checker = PREFERENCE_CHECKERS.get(doc["preference"])
    if checker is None:
        raise ValueError(f"no checker for preference {doc['preference']!r}; known: {sorted(PREFERENCE_CHECKERS)}")
    return {"satisfied": float(checker(results[0]))}
