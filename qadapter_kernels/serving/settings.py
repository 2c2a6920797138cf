"""How an engine is told to serve a Q-Adapter, and which base models the plug-in can serve.

vLLM builds a model from its HF config, so the plug-in is selected there: ``engine_arguments``
returns the ``model`` folder and an ``hf_overrides`` that names the plug-in's architecture and
carries a ``qadapter`` section (the adapter folder, the adapter switch, optional alphas). The
same dictionary serves ``vllm.LLM(**engine_arguments(...))`` and the API server (``--hf-overrides``).
Everything is checked here, before an engine starts, and again by the model class.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..logit_identity import post_head_logit_change
from ..params import PolicyParams
from .adapter import DecoderShapes, load_served_adapter, read_qadapter_config
from .checkpoint import plain_checkpoint
from .plugin import ARCHITECTURE

__all__ = ["ServingSettings", "check_base_config", "engine_arguments", "decoder_shapes"]

SECTION = "qadapter"
# The decoder families whose vLLM layers the plug-in walks (serving.model.DECODER_MODELS builds each).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Options of those families that change a layer's computation beyond what the plug-in's layer walk does.
_UNSUPPORTED_OPTIONS = ("llama_4_scaling", "ada_rms_norm_t_cond")


def _field(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def check_base_config(config: Any) -> None:
    """ValueError when the plug-in cannot serve this base model (a config object or config.json dict)."""
    model_type = _field(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"the Q-Adapter vLLM plug-in serves {SUPPORTED_MODEL_TYPES} base models, "
                         f"this one is {model_type!r}")
    # The served logits are the head applied to h_c: the customised policy only for an unaltered head.
    change = post_head_logit_change(config)
    if change is not None:
        raise ValueError(f"the base model transforms its logits after the LM head ({change[0]}={change[1]}): the "
                         "logit identity h_c = (h_q + alpha_0 h_b) / alpha_tilde cannot reproduce them")
    if _field(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {_field(config, 'hidden_act')!r} is not supported (these families use silu)")
    for option in _UNSUPPORTED_OPTIONS:
        if _field(config, option):
            raise ValueError(f"the base model sets {option}={_field(config, option)!r}, which the plug-in does not "
                             "compute")


def decoder_shapes(config: Any) -> DecoderShapes:
    """The projection sizes of a decoder config (object or dict), for checking an adapter against it."""
    heads = _field(config, "num_attention_heads")
    head_dim = _field(config, "head_dim") or _field(config, "hidden_size") // heads
    return DecoderShapes(num_layers=_field(config, "num_hidden_layers"), hidden_size=_field(config, "hidden_size"),
                       intermediate_size=_field(config, "intermediate_size"), q_size=heads * head_dim,
                       kv_size=(_field(config, "num_key_value_heads") or heads) * head_dim)


@dataclass(frozen=True)
class ServingSettings:
    """The ``qadapter`` section of the served HF config.

    ``alpha_tilde`` / ``alpha_0``: None keeps the adapter's saved value. ``enabled=False`` serves
    the base model alone through the plug-in (no adapter stream, no second KV cache).
    """

    adapter: str
    enabled: bool = True
    alpha_tilde: float | None = None
    alpha_0: float | None = None

    def policy(self, saved: PolicyParams) -> PolicyParams:
        """The adapter's saved policy with this engine's overrides, validated."""
        overrides = {k: v for k, v in (("alpha_tilde", self.alpha_tilde), ("alpha_0", self.alpha_0)) if v is not None}
        return dataclasses.replace(saved, **overrides).validated()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> "ServingSettings":
        section = _field(config, SECTION)
        if not isinstance(section, dict) or not isinstance(section.get("adapter"), str):
            raise ValueError(f"{ARCHITECTURE} needs hf_overrides {{'{SECTION}': {{'adapter': DIR}}}}; build them "
                             "with qadapter_kernels.serving.engine_arguments(adapter_dir)")
        unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown fields in the '{SECTION}' section: {unknown}")
        settings = cls(**section)
        if not isinstance(settings.enabled, bool):
            raise TypeError(f"{SECTION}.enabled must be a bool, got {type(settings.enabled).__name__}")
        return settings


def _recorded_base_mismatch(recorded: str | None, served_config: dict) -> str | None:
    """Why the base model the adapter recorded differs from the served one (None: no evidence)."""
    if not recorded or not (Path(recorded) / "config.json").is_file():
        return None  # a GGUF file or a moved folder: the shape check is the evidence left
    saved_config = json.loads((Path(recorded) / "config.json").read_text())
    for name in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if saved_config.get(name) != served_config.get(name):
            return f"{name} {saved_config.get(name)!r} (adapter's base {recorded}) != {served_config.get(name)!r}"
    return None


def engine_arguments(adapter: str | Path, base_model: str | Path | None = None, *, enabled: bool = True,
                     alpha_tilde: float | None = None, alpha_0: float | None = None) -> dict:
    """``model``, ``tokenizer`` and ``hf_overrides`` for ``vllm.LLM`` / ``vllm.EngineArgs``.

    ``base_model``: a transformers folder or a GGUF file (dequantised to fp32 once, cached); None
    takes the one recorded in the adapter's ``qadapter_config.json``. Raises ValueError for an
    adapter of another base model, a LoRA the plug-in cannot compute, or an unsupported base.
    """
    adapter = Path(adapter).expanduser().resolve()
    recorded = read_qadapter_config(adapter).base_model
    if base_model is None and recorded is None:
        raise ValueError(f"{adapter} records no base model: pass base_model")
    model = plain_checkpoint(base_model if base_model is not None else recorded)
    config = json.loads((model / "config.json").read_text())
    check_base_config(config)
    mismatch = _recorded_base_mismatch(recorded, config)
    if mismatch is not None:
        raise ValueError(f"the adapter {adapter} was trained on another base model: {mismatch}")
    settings = ServingSettings(adapter=str(adapter), enabled=enabled, alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    settings.policy(load_served_adapter(adapter, decoder_shapes(config)).policy)  # every check, before an engine
    return {"model": str(model), "tokenizer": str(model),
            "hf_overrides": {"architectures": [ARCHITECTURE], SECTION: settings.to_dict()}}
