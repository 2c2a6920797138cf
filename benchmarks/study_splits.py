"""Train / validation / test splits of a shipped preference, disjoint by item and by prompt template.

The shipped train/held-out split keeps items apart but not wordings: most held-out prompts share a
template ("What is the capital of {c}?") with training prompts. Here whole templates (each with all
its items) are dealt to the three splits, so no split shares an item or a template with another; what
overlap remains (prompts that still share a three-word sequence, numbers and quoted words masked) is
measured and reported.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from qadapter_kernels.app.make_preferences import build_splits
from qadapter_kernels.app.preference_items import build_items

SPLIT_SEED = 20261215
FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


@dataclass
class StudySplits:
    """Each split's preference records (``prompt``/``chosen``/``rejected`` rows) and what they share."""

    records: dict[str, list[dict]]
    templates: dict[str, list[str]]
    overlap: dict

    def prompts(self, split: str) -> list[str]:
        return [r["prompt"][0]["content"] for r in self.records[split]]

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.records.items()}


def study_splits(preference: str, seed: int = SPLIT_SEED) -> StudySplits:
    """The records of ``preference`` (the shipped pairs, train and held-out together) dealt by template."""
    answers = [a for part in build_items() for a in part]
    records = [r for part in build_splits(preference) for r in part]
    for answer, record in zip(answers, records):
        if record["prompt"][0]["content"] != answer.prompt:  # the generators' order is the files' order
            raise AssertionError(f"items and {preference} records out of step at {answer.prompt!r}")
    sizes = Counter(f"{a.category}: {a.template}" for a in answers)
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    targets = {name: fraction * len(answers) for name, fraction in FRACTIONS.items()}
    counts = dict.fromkeys(FRACTIONS, 0)
    split_of = {}
    for template in order:  # each template to the split furthest below its share
        name = max(FRACTIONS, key=lambda n: (targets[n] - counts[n]) / targets[n])
        split_of[template] = name
        counts[name] += sizes[template]
    out = {name: [] for name in FRACTIONS}
    keys = {name: set() for name in FRACTIONS}
    for answer, record in zip(answers, records):
        name = split_of[f"{answer.category}: {answer.template}"]
        out[name].append(record)
        keys[name].add(f"{answer.category}: {answer.key}")
    templates = {name: sorted(t for t, n in split_of.items() if n == name) for name in FRACTIONS}
    splits = StudySplits(out, templates, {})
    splits.overlap = _overlap(splits, keys)
    return splits


def _shape(prompt: str) -> list[str]:
    masked = re.sub(r'"[^"]*"', " Q ", prompt.lower())
    return re.sub(r"\d+", " N ", masked).replace("?", " ").replace(".", " ").split()


def _trigrams(prompt: str) -> set[tuple[str, ...]]:
    words = _shape(prompt)
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def _overlap(splits: StudySplits, keys: dict[str, set]) -> dict:
    """What validation and test still share with train: items, templates, exact prompts, 3-word sequences."""
    train_grams = set().union(*(_trigrams(p) for p in splits.prompts("train")))
    train_prompts = set(splits.prompts("train"))
    report = {}
    for name in ("validation", "test"):
        prompts = splits.prompts(name)
        report[name] = {
            "shared_items": len(keys[name] & keys["train"]),
            "shared_templates": len(set(splits.templates[name]) & set(splits.templates["train"])),
            "identical_prompts": sum(p in train_prompts for p in prompts),
            "prompts_sharing_a_3_word_sequence_with_train": sum(bool(_trigrams(p) & train_grams) for p in prompts),
            "prompts": len(prompts),
        }
    return report
