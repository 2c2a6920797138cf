"""Stated performance targets and their verdicts: one row per target and config, in one format.

A benchmark declares its targets as :class:`Target` rows and calls :func:`verdict_lines`; every
script prints and saves the same line shape, so a reader (or the profiling CI) parses one format:

    PASS target: qadapter_kernels x compile <= 0.8 at shape=2x512x32000 float32 cpu (got 0.426)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from runner import BenchResult

_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    """``provider``'s ``metric`` (a ``BenchResult.extra`` column) ``op`` ``bound`` on ``device`` configs.

    ``stated_on(result)`` picks the configs the target is stated for: they get PASS/FAIL; the
    provider's other configs on that device get INFO (the figure, without a verdict).
    """

    provider: str
    metric: str
    op: str
    bound: float
    device: str
    stated_on: Callable[[BenchResult], bool] = lambda result: True

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"op must be one of {sorted(_OPS)}, got {self.op!r}")


def where(dtype: str | None = None, **config: Any) -> Callable[[BenchResult], bool]:
    """A ``stated_on`` predicate: the result's config has these values (and this dtype, if given)."""

    def matches(result: BenchResult) -> bool:
        return (dtype is None or result.dtype == dtype) and all(result.config.get(k) == v for k, v in config.items())

    return matches


def _config_text(result: BenchResult) -> str:
    config = " ".join(f"{k}={v}" for k, v in result.config.items())
    return f"{config} {result.dtype} {result.device}".strip()


def verdicts(targets: Sequence[Target], results: Sequence[BenchResult], device: str) -> list[dict[str, Any]]:
    """One record per target and matching result (status PASS, FAIL, INFO) or per unmatched target (SKIP)."""
    device_type = device.split(":")[0]
    records = []
    for target in targets:
        if target.device != device_type:
            continue
        hits = [r for r in results if r.provider == target.provider and target.metric in r.extra]
        if not any(target.stated_on(r) for r in hits):
            records.append(dict(status="SKIP", target=target, result=None, value=None))
        for r in hits:
            value = r.extra[target.metric]
            passed = _OPS[target.op](value, target.bound)
            status = ("PASS" if passed else "FAIL") if target.stated_on(r) else "INFO"
            records.append(dict(status=status, target=target, result=r, value=value))
    return records


def verdict_line(record: dict[str, Any]) -> str:
    t = record["target"]
    what = f"{t.provider} {t.metric} {t.op} {t.bound:g}"
    if record["result"] is None:
        return f"SKIP target: {what} (no config it is stated on was run)"
    return f"{record['status']} target: {what} at {_config_text(record['result'])} (got {record['value']:.3g})"


def verdict_lines(targets: Sequence[Target], results: Sequence[BenchResult], device: str) -> list[str]:
    """The PASS/FAIL/INFO/SKIP lines of ``targets`` over ``results`` (reported, not asserted)."""
    return [verdict_line(r) for r in verdicts(targets, results, device)]
