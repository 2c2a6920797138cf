"""How the shipped tasks are scored: retention on content (case ignored), preferences by their own checker.

Used by the lm-eval task files (``tasks/utils.py`` re-exports these) and by the forgetting
benchmark, so both score the same way.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ..training.make_preferences import satisfies_preference as lowercase_satisfied
from .make_tasks import PREFERENCE_FILE, RETENTION_FILE, TASKS_DIR, case_variants

__all__ = ["PREFERENCE_CHECKERS", "option_scores", "preference_process_results", "read_task_records",
           "retention_choices", "retention_process_results"]

# A preference's name (as in the task records) -> True when a response satisfies it.
PREFERENCE_CHECKERS: dict[str, Callable[[str], bool]] = {"lowercase": lowercase_satisfied}


def read_task_records(name: str) -> list[dict]:
    """The records of a shipped task: ``"retention"`` or ``"preference"``."""
    files = {"retention": RETENTION_FILE, "preference": PREFERENCE_FILE}
    if name not in files:
        raise ValueError(f"task must be one of {sorted(files)}, got {name!r}")
    lines = (Path(TASKS_DIR) / files[name]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def retention_choices(doc: dict) -> list[str]:
    """Every case variant of every option, option by option: what is scored."""
    return [variant for option in doc["options"] for variant in case_variants(option)]


def option_scores(doc: dict, loglikelihoods: Sequence[float]) -> list[float]:
    """Per option, the log of the summed probability of its case variants (``loglikelihoods``: per choice)."""
    scores, offset = [], 0
    for option in doc["options"]:
        n = len(case_variants(option))
        scores.append(_logsumexp(loglikelihoods[offset:offset + n]))
        offset += n
    if offset != len(loglikelihoods):
        raise ValueError(f"expected {offset} log-likelihoods for {doc['question']!r}, got {len(loglikelihoods)}")
    return scores


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def retention_process_results(doc: dict, results) -> dict[str, float]:
    """lm-eval's per-document metrics: ``acc`` (content, any case) and ``acc_cased`` (options as written only)."""
    loglikelihoods = [r[0] if isinstance(r, (tuple, list)) else r for r in results]
    scores = option_scores(doc, loglikelihoods)
    as_written, offset = [], 0
    for option in doc["options"]:
        as_written.append(loglikelihoods[offset])
        offset += len(case_variants(option))
    target = doc["target"]
    return {"acc": float(max(range(len(scores)), key=scores.__getitem__) == target),
            "acc_cased": float(max(range(len(as_written)), key=as_written.__getitem__) == target)}


def preference_process_results(doc: dict, results) -> dict[str, float]:
    """lm-eval's per-document metric ``satisfied``: the greedy answer passes the preference's checker."""
    checker = PREFERENCE_CHECKERS.get(doc["preference"])
    if checker is None:
        raise ValueError(f"no checker for preference {doc['preference']!r}; known: {sorted(PREFERENCE_CHECKERS)}")
    return {"satisfied": float(checker(results[0]))}
