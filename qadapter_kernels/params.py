"""The hyper-parameters of the method and of sampling: one home for their names, defaults and ranges.

Every layer takes them from here: the public ops (as keywords whose signature is generated from
these fields), the reference, the training config, the command line and ``generate``. A new
field, or a new default chosen from evidence, is one edit in this file.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch


class _KernelChoice(str, enum.Enum):
    """A ``str`` enum the kernels receive as an integer (``.code``, a Triton constexpr): a new member
    is a new code, never a new kernel signature. ``Choice("x") is Choice.X`` and a member compares
    equal to its value, so configs and command lines keep plain strings."""

    @classmethod
    def parse(cls, value: object):
        """The member for ``value`` (a member or its string), or a ValueError naming the field."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{cls.FIELD} must be one of {[v.value for v in cls]}{cls.ALIASES}, "
                             f"got {value!r}") from None

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        return list(type(self)).index(self)


class RewardVariant(_KernelChoice):
    """Which action a position scores and which value bootstraps its reward (docs/DESIGN.md §2)."""

    BELLMAN = "bellman"
    OFFICIAL = "official"
    ADVANTAGE = "advantage"


RewardVariant.FIELD, RewardVariant.ALIASES = "variant", ""


class LengthNorm(_KernelChoice):
    """What a sequence's summed reward is divided by to give its score (docs/DESIGN.md §2).

    ``RESPONSE``: its own number of scored actions (1 when it has none), so a score is a property
    of the sequence, never of how wide the batch it was padded into is. ``PADDED``: ``T - 1``,
    the padded batch width minus one (the authors' rule; ``True`` means this). ``NONE``: the sum
    (``False`` means this).
    """

    RESPONSE = "response"
    PADDED = "padded"
    NONE = "none"

    @classmethod
    def parse(cls, value: object) -> "LengthNorm":
        if isinstance(value, bool):  # the former bool flag: True was the authors' rule
            return cls.PADDED if value else cls.NONE
        return super().parse(value)


LengthNorm.FIELD, LengthNorm.ALIASES = "length_norm", " (or True = 'padded', False = 'none')"


def check_scalar(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    """A finite real in [low, high] (or (low, high] with low_open); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return value


def check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


INF = float("inf")


@dataclass(frozen=True)
class PolicyParams:
    """The customised policy ``pi~ ∝ exp((Q + alpha_0 log pi_1) / alpha_tilde)``: what decoding needs."""

    alpha_tilde: float = 1.0
    alpha_0: float = 0.01

    def validated(self):
        """A copy with every field checked (ValueError/TypeError naming the field) and normalised."""
        return dataclasses.replace(self, **_validate_fields(self))

    def for_adapter(self, enabled: bool) -> "PolicyParams":
        """This policy with the adapter on; with it off (``Q = L``) ``PLAIN_POLICY``, the base model's own."""
        return self if enabled else PLAIN_POLICY

    # The logit identity (docs/DESIGN.md §1): with Q = W h_q + b and L = W h_b + b from one affine head,
    # (Q + alpha_0 log_softmax(L)) / alpha_tilde = W h_c + b' minus a per-row constant, so the customised
    # policy is the head applied once to h_c with bias b'. Neither casts: the caller picks the dtype
    # (greedy decodes compare token for token, so every caller keeps its own precision).

    def combined_hidden(self, adapter_hidden: torch.Tensor, base_hidden: torch.Tensor) -> torch.Tensor:
        """``h_c = (h_q + alpha_0 h_b) / alpha_tilde``."""
        return (adapter_hidden + self.alpha_0 * base_hidden) / self.alpha_tilde

    def combined_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """``b' = b (1 + alpha_0) / alpha_tilde``, the head's bias on ``h_c``."""
        return bias * (1.0 + self.alpha_0) / self.alpha_tilde


# softmax(Q) itself (alpha_tilde = 1, alpha_0 = 0): with the adapter off (Q = L) the base model's policy;
# on a head product that already holds the whole policy (composition's mixed hidden state), that policy.
PLAIN_POLICY = PolicyParams(alpha_tilde=1.0, alpha_0=0.0)


@dataclass(frozen=True)
class QAdapterParams(PolicyParams):
    """The policy plus what the loss adds: the Bellman discount, the regulariser, the reward variant."""

    gamma: float = 1.0
    beta: float = 0.1
    # From benchmarks/bench_forgetting.py and docs/DESIGN.md §2 (docs/forgetting.md). "advantage":
    # its regulariser anchors the likelihood of what the pairs say, where bellman's moves raw logit levels
    # and, at a learning rate that learns, teaches the adapter never to end an answer. "response": a
    # summed score starts saturated on a pair whose rejected answer is only longer (a fresh adapter's
    # score is the base log-likelihood), so a "shorter answers" preference gives no gradient.
    variant: RewardVariant = RewardVariant.ADVANTAGE
    length_norm: LengthNorm = LengthNorm.RESPONSE

    @property
    def policy(self) -> PolicyParams:
        return PolicyParams(self.alpha_tilde, self.alpha_0)


@dataclass(frozen=True)
class SamplingParams:
    """Hugging Face's order: temperature -> top_k -> top_p -> min_p -> sample. Each field is a Python
    scalar or a per-row ``[B]`` tensor (a serving batch mixes requests); tensors are range-checked by
    the op that reads them, in the same host sync as its other value checks."""

    temperature: Any = 1.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0

    def validated(self):
        return dataclasses.replace(self, **_validate_fields(self))


@dataclass(frozen=True)
class SequenceLimits:
    """How much of a preference pair training sees: tokens per prompt + response, and prompt tokens kept
    (a longer prompt is cut first, then the responses; ``training.data.tokenize_preference``)."""

    max_length: int = 512
    max_prompt_length: int = 256

    def validated(self):
        checked = dataclasses.replace(self, **_validate_fields(self))
        if checked.max_prompt_length >= checked.max_length:
            raise ValueError(f"max_prompt_length must be < max_length (a response needs room), got "
                             f"{checked.max_prompt_length} >= {checked.max_length}")
        return checked


# The LoRA Q-function's learning rate (linear decay): at the authors' 3e-4 (docs/DESIGN.md §1) a short
# run (the demo's 40 steps of 4 pairs) barely moves the policy; benchmarks/bench_forgetting.py.
LEARNING_RATE = 1e-3
LR_SCHEDULER = "linear"  # transformers' scheduler name: the rate decays linearly to 0

# (low, high, low_open) of each real field; int, bool and enum fields have their own checks. The
# samplers read these too, to range-check per-row tensors.
RANGES: dict[str, tuple[float, float, bool]] = {
    "alpha_tilde": (0.0, INF, True),
    "alpha_0": (0.0, INF, False),
    "gamma": (0.0, 1.0, False),
    "beta": (0.0, INF, False),
    "temperature": (0.0, INF, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0 - 1e-12, False),
}
INT_RANGES: dict[str, tuple[int, int]] = {"top_k": (0, 2**62), "max_length": (1, 2**62), "max_prompt_length": (1, 2**62)}


def _validate_fields(params) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if _is_tensor(value):
            out[f.name] = value  # checked where it is read, with the op's other value checks
        elif f.name in RANGES:
            out[f.name] = check_scalar(f.name, value, *RANGES[f.name])
        elif f.name in INT_RANGES:
            out[f.name] = check_int(f.name, value, *INT_RANGES[f.name])
        elif f.name == "variant":
            out[f.name] = RewardVariant.parse(value)
        elif f.name == "length_norm":
            out[f.name] = LengthNorm.parse(value)
        else:  # pragma: no cover - a new field must say how it is checked
            raise AssertionError(f"no check for parameter {f.name}")
    return out


def _is_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor)


P = TypeVar("P")


def resolve(cls: type[P], params: P | None, overrides: dict[str, Any]) -> P:
    """``params`` (or the defaults) with keyword overrides on top, validated.

    Unknown keywords are a TypeError naming them, as Python reports them for a normal signature.
    Results for plain values (numbers, strings, the enums; no tensors) are remembered: a training
    loop or a decoder calls the ops with the same parameters every step, and validating them
    again would cost more than a small kernel.
    """
    if params is not None and not isinstance(params, cls):
        raise TypeError(f"params must be a {cls.__name__} or None, got {type(params).__name__}")
    key = None if torch.compiler.is_compiling() else _plain_key(cls, params, overrides)
    if key is not None and key in _RESOLVED:
        return _RESOLVED[key]
    names = set(cls.__dataclass_fields__)  # not dataclasses.fields(cls): torch.compile traces this
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; {cls.__name__} has {sorted(names)}")
    base = params if params is not None else cls()
    resolved = dataclasses.replace(base, **overrides).validated()
    if key is not None:
        if len(_RESOLVED) >= _RESOLVED_LIMIT:
            _RESOLVED.clear()
        _RESOLVED[key] = resolved
    return resolved


_PLAIN_TYPES = (bool, int, float, str, RewardVariant, LengthNorm)
_RESOLVED: dict[tuple, Any] = {}
_RESOLVED_LIMIT = 1024


def _plain_key(cls: type, params: object, overrides: dict[str, Any]) -> tuple | None:
    """A hashable key of a resolve call whose values are all plain, else None. Each value's type is
    part of the key: True == 1 == 1.0 must not share a result (a bool is no number here)."""
    given = list(overrides.items()) if params is None else [*params.__dict__.items(), None, *overrides.items()]
    key = [cls, params is None]
    for item in given:
        if item is not None:
            if type(item[1]) not in _PLAIN_TYPES:
                return None
            key += (item[0], type(item[1]), item[1])
    return tuple(key)


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A sampler's keyword overrides: (the policy's, and any unknown name, for resolve to report; the sampling ones)."""
    sampling_names = set(SamplingParams.__dataclass_fields__)
    return ({k: v for k, v in overrides.items() if k not in sampling_names},
            {k: v for k, v in overrides.items() if k in sampling_names})


F = TypeVar("F", bound=Callable[..., Any])


def with_param_keywords(*classes: type) -> Callable[[F], F]:
    """Advertises the fields of ``classes`` as keyword-only arguments in ``fn``'s signature.

    ``fn`` takes them through ``**kwargs``; this only makes ``help()``, ``inspect.signature`` and
    IDEs show each name with its default, generated from the dataclasses (never spelled out twice).
    """

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        seen = {p.name for p in params}
        extra = []
        for cls in classes:
            for f in dataclasses.fields(cls):
                if f.name not in seen:
                    seen.add(f.name)
                    extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                                   annotation=f.type))
        # Keyword-only parameters may follow positional ones in any order; keep the function's own last.
        head = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        tail = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        fn.__signature__ = sig.replace(parameters=[*head, *extra, *tail])
        return fn

    return decorate


# Named starting points for the Q-Adapter hyper-parameters (the command line's --preset).
# "authors": the released training code's reward and its length normalisation (each score divided
# by the padded batch width minus 1, which ``length_norm=True`` means).
PRESETS: dict[str, QAdapterParams] = {
    "default": QAdapterParams(),
    "authors": QAdapterParams(variant=RewardVariant.OFFICIAL, length_norm=True),
}
