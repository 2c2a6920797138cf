"""``QAdapterTrainingArguments``: ``transformers.TrainingArguments`` plus the Q-Adapter settings, the
way TRL's ``DPOConfig`` extends it for DPO, so a DPO script switches by changing the config class.

The method's fields (alpha_tilde, alpha_0, gamma, beta, variant, length_norm) are generated from
``params.QAdapterParams``: their names, types, defaults and checks live there only. DPOConfig's own
fields are generated from ``dpo_fields.DPOConfigFields``, which also says what each one does here.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import transformers

from ..params import LEARNING_RATE, QAdapterParams, SequenceLimits, check_bool, check_scalar
from ..model import QAdapterConfig
from .data import DEFAULT_PROMPT_TRUNCATION, PROMPT_TRUNCATIONS
from .dpo_fields import DPOConfigFields, check_dpo_fields, normalise_dpo_fields

__all__ = ["QAdapterTrainingArguments"]

_PARAM_HELP = {
    "alpha_tilde": "temperature of the customised policy pi~ ∝ exp((Q + alpha_0 log pi_1) / alpha_tilde)",
    "alpha_0": "weight of the base model's log-probabilities in the customised policy",
    "gamma": "Bellman discount of the residual reward",
    "beta": "weight of the squared-reward regulariser (not DPO's KL temperature)",
    "variant": "which action a position scores and which value bootstraps its reward: 'bellman', 'advantage' or the authors' 'official' (docs/DESIGN.md §2)",
    "length_norm": "score normalisation: 'response' (own scored actions), 'padded' (T - 1, the authors'), 'none'",
}


def _with_fields_of(source: type):
    """Adds ``source``'s dataclass fields (type, default and help as declared there) to the decorated
    class, which ``@dataclass`` then turns into fields of its own: nothing is spelled out twice."""

    def decorate(cls: type) -> type:
        hints = typing.get_type_hints(source)
        for f in dataclasses.fields(source):
            cls.__annotations__[f.name] = hints[f.name]
            help_text = _PARAM_HELP.get(f.name) or f.metadata.get("help") or f"{source.__name__}.{f.name}"
            setattr(cls, f.name, field(default=f.default, default_factory=f.default_factory,
                                       metadata={"help": help_text}))
        return cls

    return decorate


_LIMITS = SequenceLimits()


@dataclass
@_with_fields_of(QAdapterParams)
@_with_fields_of(DPOConfigFields)
class QAdapterTrainingArguments(transformers.TrainingArguments):
    """``TrainingArguments`` with the Q-Adapter hyper-parameters and the data limits.

    Defaults that differ from ``TrainingArguments``: ``learning_rate`` is the authors' (a LoRA
    Q-function, not DPO's full-model 1e-6); ``logging_steps=10`` as in TRL's configs (the Trainer's
    500 hides a short run); ``remove_unused_columns=False``, because the collator reads the raw
    preference columns that the model's ``forward`` does not name. Everything else is the Trainer's:
    ``report_to`` is already "none" and ``gradient_checkpointing``/``bf16`` are left off (TRL turns
    them on; here they are a choice of the user's hardware, and bf16 on a CPU without native bf16
    is slower, not faster).

    ``precompute_base``, ``base_cache_dir``, ``base_cache_max_gb``: caching the frozen base model's
    hidden states across epochs (training/base_cache.py).

    Every field of TRL's ``DPOConfig`` is accepted, so TRL's scripts and command lines run with the
    class swapped: each is honoured, refused with its reason when set to what it cannot mean here,
    or ignored with a reason (the tables of ``training/dpo_fields.py``).
    """

    _VALID_DICT_FIELDS = [*transformers.TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    max_length: int = field(default=_LIMITS.max_length, metadata={"help": "tokens per prompt + response"})
    max_prompt_length: int | None = field(default=None, metadata={
        "help": "prompt tokens kept (None: SequenceLimits' default, at most half of max_length)"})
    prompt_truncation: str = field(default=DEFAULT_PROMPT_TRUNCATION, metadata={
        "help": "which prompt tokens a long prompt keeps", "choices": list(PROMPT_TRUNCATIONS)})
    tile_budget_mb: float | None = field(
        default=QAdapterConfig.__dataclass_fields__["tile_budget_mb"].default,
        metadata={"help": "memory for one logits tile of the fused loss, in MB (None: the op's default)"})
    precompute_base: bool = field(default=False, metadata={
        "help": "compute the frozen base model's hidden states once and reuse them every epoch"})
    base_cache_dir: str | None = field(default=None, metadata={
        "help": "where precomputed base hidden states are kept (None: in memory)"})
    base_cache_max_gb: float | None = field(default=None, metadata={
        "help": "the most the base cache may hold, in GB (None: no limit)"})
    learning_rate: float = field(default=LEARNING_RATE, metadata={"help": "the initial AdamW learning rate"})
    logging_steps: float = field(default=10, metadata={"help": "log every N update steps (a fraction: of all)"})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "keep False: the preference columns are read by the collator, not by forward()"})

    def __post_init__(self) -> None:
        super().__post_init__()  # parses a JSON string model_init_kwargs, as DPOConfig's does
        normalise_dpo_fields(self)
        check_dpo_fields(self)
        params = self.qadapter_params  # normalised: "official" -> RewardVariant.OFFICIAL, True -> "padded"
        for f in dataclasses.fields(QAdapterParams):
            setattr(self, f.name, getattr(params, f.name))
        if self.max_prompt_length is None:  # a DPO script often sets max_length alone: leave room for responses
            half = self.max_length // 2 if isinstance(self.max_length, int) else self.max_length
            self.max_prompt_length = min(_LIMITS.max_prompt_length, half)
        limits = SequenceLimits(self.max_length, self.max_prompt_length).validated()
        self.max_length, self.max_prompt_length = limits.max_length, limits.max_prompt_length
        if self.prompt_truncation not in PROMPT_TRUNCATIONS:
            raise ValueError(f"prompt_truncation must be one of {PROMPT_TRUNCATIONS}, got {self.prompt_truncation!r}")
        if self.tile_budget_mb is not None:
            self.tile_budget_mb = check_scalar("tile_budget_mb", self.tile_budget_mb, 0.0, float("inf"), low_open=True)
        check_bool("precompute_base", self.precompute_base)
        if self.base_cache_dir is not None and not isinstance(self.base_cache_dir, str):
            raise TypeError(f"base_cache_dir must be a path string or None, got {type(self.base_cache_dir).__name__}")
        if self.base_cache_max_gb is not None:
            self.base_cache_max_gb = check_scalar("base_cache_max_gb", self.base_cache_max_gb, 0.0, float("inf"),
                                                  low_open=True)

    @property
    def qadapter_params(self) -> QAdapterParams:
        """The method's hyper-parameters, validated (ValueError/TypeError naming the field)."""
        return QAdapterParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QAdapterParams)}).validated()

    def qadapter_config(self, base: QAdapterConfig | None = None) -> QAdapterConfig:
        """``base`` (LoRA settings, base model; default ``QAdapterConfig()``) with these hyper-parameters."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(QAdapterParams)}
        return dataclasses.replace(base or QAdapterConfig(), **fields, tile_budget_mb=self.tile_budget_mb).validate()
