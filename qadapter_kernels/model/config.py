"""The configuration of a Q-Adapter model: its hyper-parameters and its LoRA's (light: no torch import)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..params import QAdapterParams, check_scalar
from ..prompts import PROMPT_FORMATS

__all__ = ["QAdapterConfig"]


@dataclass(frozen=True)
class QAdapterConfig(QAdapterParams):
    """The Q-Adapter hyper-parameters (``QAdapterParams``: names, defaults, ranges) plus LoRA's.

    ``base_model`` is the path the base model was loaded from (a folder, or a ``.gguf`` file),
    recorded so that a saved adapter can be loaded back without naming it again.
    ``tile_budget_mb`` is passed to ``fused_linear_qadapter_loss`` (None: its default).
    ``prompt_format``: how the training prompts were encoded (``prompts.PROMPT_FORMATS``; None: not
    recorded), with ``chat_template_sha256`` for a chat template; decoding encodes prompts the same way.
    """

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    base_model: str | None = None
    tile_budget_mb: float | None = None
    prompt_format: str | None = None
    chat_template_sha256: str | None = None

    @property
    def params(self) -> QAdapterParams:
        """The Q-Adapter hyper-parameters alone, as the loss takes them."""
        return QAdapterParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QAdapterParams)})

    def validate(self) -> "QAdapterConfig":
        """A checked copy: ValueError (TypeError for a wrong type) naming the first bad field."""
        checked = self.params.validated()
        check_scalar("lora_alpha", self.lora_alpha, 0.0, float("inf"), low_open=True)
        if check_scalar("lora_dropout", self.lora_dropout, 0.0, 1.0) == 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be an integer >= 1, got {self.lora_r!r}")
        if (isinstance(self.target_modules, str) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise ValueError(f"target_modules must be a non-empty sequence of names, got {self.target_modules!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a path string or None, got {type(self.base_model).__name__}")
        if self.tile_budget_mb is not None:
            check_scalar("tile_budget_mb", self.tile_budget_mb, 0.0, float("inf"), low_open=True)
        if self.prompt_format is not None and self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS} or None, got {self.prompt_format!r}")
        checked_fields = {f.name: getattr(checked, f.name) for f in dataclasses.fields(checked)}
        return dataclasses.replace(self, **checked_fields, target_modules=tuple(self.target_modules))

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``fused_linear_qadapter_loss`` / ``qadapter_loss`` this config sets."""
        params = self.params
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}

    def lora_config(self):
        """The ``peft.LoraConfig`` of the LoRA fields."""
        import peft

        return peft.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=list(self.target_modules), task_type="CAUSAL_LM")

    def to_json(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Enums (the reward variant) are str enums: written as their plain value.
        return json.dumps({**fields, "target_modules": list(self.target_modules)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QAdapterConfig":
        """Parses and validates ``to_json`` output; unknown fields are an error (a typo would be ignored)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a Q-Adapter config must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown Q-Adapter config fields: {unknown}")
        if "target_modules" in data and isinstance(data["target_modules"], list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data).validate()
