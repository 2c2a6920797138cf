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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..logit_identity import post_head_logit_change
from ..params import PolicyParams
from .adapter import DecoderShapes, load_served_adapter, read_qadapter_config
from .checkpoint import plain_checkpoint
from .plugin import ARCHITECTURE, ROUTING_PROCESSOR

__all__ = ["BASE_ROUTE", "REQUEST_ADAPTER", "REQUEST_STRENGTH", "NamedAdapter", "RequestRoute", "ServingSettings",
           "check_base_config", "decoder_shapes", "default_name", "engine_arguments", "request_route", "served_routes"]

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
                       kv_size=(_field(config, "num_key_value_heads") or heads) * head_dim, head_dim=head_dim)


@dataclass(frozen=True)
class NamedAdapter:
    """One served Q-Adapter: the name a request chooses it by, its folder, and this engine's strength
    (None keeps the adapter's saved ``alpha_tilde`` / ``alpha_0``)."""

    name: str
    adapter: str
    alpha_tilde: float | None = None
    alpha_0: float | None = None

    def policy(self, saved: PolicyParams) -> PolicyParams:
        """The adapter's saved policy with this engine's overrides, validated."""
        return _with_strength(saved, self.alpha_tilde, self.alpha_0)


def _with_strength(policy: PolicyParams, alpha_tilde: float | None, alpha_0: float | None) -> PolicyParams:
    overrides = {k: v for k, v in (("alpha_tilde", alpha_tilde), ("alpha_0", alpha_0)) if v is not None}
    return dataclasses.replace(policy, **overrides).validated()


BASE_ROUTE = -1  # a request's route to the base model alone (one stream)
ROUTES_ENV = "QADAPTER_SERVED_ROUTES"  # name -> route of the engine last configured, for request validation
REQUEST_ADAPTER, REQUEST_STRENGTH = "qadapter", ("alpha_tilde", "alpha_0")  # SamplingParams.extra_args keys


@dataclass(frozen=True)
class ServingSettings:
    """The ``qadapter`` section of the served HF config.

    ``adapters``: the served Q-Adapters; the first is what a request naming none decodes with.
    ``enabled=False`` serves the base model alone through the plug-in (no adapter stream, no second
    KV cache). ``base_name``: a request naming it gets the base model alone.
    """

    adapters: tuple[NamedAdapter, ...]
    enabled: bool = True
    base_name: str | None = None

    def routes(self) -> dict[str, int]:
        """Request name -> index into ``adapters``, or ``BASE_ROUTE``."""
        routes = {a.name: i for i, a in enumerate(self.adapters)}
        return routes | ({self.base_name: BASE_ROUTE} if self.base_name else {})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> "ServingSettings":
        section = _field(config, SECTION)
        if not isinstance(section, dict) or not isinstance(section.get("adapters"), (list, tuple)):
            raise ValueError(f"{ARCHITECTURE} needs hf_overrides {{'{SECTION}': {{'adapters': [...]}}}}; build them "
                             "with qadapter_kernels.serving.engine_arguments(adapter_dir)")
        _refuse_unknown(section, cls, f"the '{SECTION}' section")
        adapters = []
        for entry in section["adapters"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("adapter"), str):
                raise ValueError(f"{SECTION}.adapters: each entry needs an 'adapter' folder, got {entry!r}")
            _refuse_unknown(entry, NamedAdapter, f"{SECTION}.adapters")
            adapters.append(NamedAdapter(**entry))
        settings = cls(**{**section, "adapters": tuple(adapters)})
        if not adapters:
            raise ValueError(f"{SECTION}.adapters is empty")
        if not isinstance(settings.enabled, bool):
            raise TypeError(f"{SECTION}.enabled must be a bool, got {type(settings.enabled).__name__}")
        names = [a.name for a in adapters] + ([settings.base_name] if settings.base_name else [])
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{SECTION}: the adapters and the base model need distinct non-empty names, got {names}")
        return settings


def _refuse_unknown(section: dict, cls: type, where: str) -> None:
    unknown = sorted(set(section) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown fields in {where}: {unknown}")


@dataclass(frozen=True)
class RequestRoute:
    """What one request decodes with: ``index`` into the engine's adapters (``BASE_ROUTE``: the base model
    alone) and its own strength (None: the engine's)."""

    index: int
    alpha_tilde: float | None = None
    alpha_0: float | None = None

    def policy(self, engine_policy: PolicyParams) -> PolicyParams:
        return _with_strength(engine_policy, self.alpha_tilde, self.alpha_0)


def request_route(extra_args: Mapping[str, Any] | None, routes: Mapping[str, int] | None) -> RequestRoute | None:
    """A request's route from its ``SamplingParams.extra_args`` (``qadapter``: a served name; ``alpha_tilde``,
    ``alpha_0``: its strength); None for the default adapter at the engine's strength. ``routes`` None: the
    names are not known here, only their form is checked. ValueError naming the argument otherwise."""
    extra_args = extra_args or {}
    name = extra_args.get(REQUEST_ADAPTER)
    strength = {k: extra_args[k] for k in REQUEST_STRENGTH if extra_args.get(k) is not None}
    if name is None and not strength:
        return None
    if name is not None and not isinstance(name, str):
        raise ValueError(f"{REQUEST_ADAPTER} must be the name of a served adapter, got {name!r}")
    if name is not None and routes is not None and name not in routes:
        raise ValueError(f"{REQUEST_ADAPTER}={name!r} is not served here (served: {', '.join(routes)})")
    index = 0 if name is None or routes is None else routes[name]
    if index == 0 and not strength:
        return None  # the default adapter, by name
    if index == BASE_ROUTE and strength:
        raise ValueError(f"{name!r} is the base model: {', '.join(strength)} do not apply to it")
    for key, value in strength.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
    _with_strength(PolicyParams(), strength.get("alpha_tilde"), strength.get("alpha_0"))  # range checks
    return RequestRoute(index, **{k: float(v) for k, v in strength.items()})


def served_routes() -> dict[str, int] | None:
    """The routes ``engine_arguments`` last configured in this process or a parent (``ROUTES_ENV``), or None."""
    text = os.environ.get(ROUTES_ENV)
    return json.loads(text) if text else None


def _recorded_base_mismatch(recorded: str | None, served_config: dict) -> str | None:
    """Why the base model the adapter recorded differs from the served one (None: no evidence)."""
    if not recorded or not (Path(recorded) / "config.json").is_file():
        return None  # a GGUF file or a moved folder: the shape check is the evidence left
    saved_config = json.loads((Path(recorded) / "config.json").read_text())
    for name in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if saved_config.get(name) != served_config.get(name):
            return f"{name} {saved_config.get(name)!r} (adapter's base {recorded}) != {served_config.get(name)!r}"
    return None


def default_name(folder: str | Path) -> str:
    """The name an adapter is served under when none is given: its folder's."""
    return Path(folder).expanduser().resolve().name


def engine_arguments(adapter: str | Path, base_model: str | Path | None = None, *, enabled: bool = True,
                     alpha_tilde: float | None = None, alpha_0: float | None = None, name: str | None = None,
                     more: Mapping[str, str | Path | Mapping[str, Any]] | None = None,
                     base_name: str | None = None) -> dict:
    """``model``, ``tokenizer``, ``hf_overrides`` and ``logits_processors`` for ``vllm.LLM`` / ``vllm.EngineArgs``.

    ``adapter`` is what a request naming none decodes with, under ``name`` (default: its folder's name),
    at ``alpha_tilde`` / ``alpha_0`` (None: its saved values). ``more``: further adapters of the same
    base model, name -> folder or ``{"adapter": folder, "alpha_tilde": ..., "alpha_0": ...}``.
    ``base_name``: requests naming it get the base model alone. A request chooses through
    ``SamplingParams(extra_args={"qadapter": name, "alpha_tilde": ..., "alpha_0": ...})`` (the
    strength is optional; the server maps the OpenAI ``model`` field to ``qadapter``).

    ``base_model``: a transformers folder or a GGUF file (dequantised to fp32 once, cached); None
    takes the one recorded in the default adapter's ``qadapter_config.json``. Raises ValueError for
    an adapter of another base model, a LoRA the plug-in cannot compute, clashing names, or an
    unsupported base. Records the served names in ``QADAPTER_SERVED_ROUTES`` so that requests naming
    another are refused before they reach the engine.
    """
    adapter = Path(adapter).expanduser().resolve()
    recorded = read_qadapter_config(adapter).base_model
    if base_model is None and recorded is None:
        raise ValueError(f"{adapter} records no base model: pass base_model")
    model = plain_checkpoint(base_model if base_model is not None else recorded)
    config = json.loads((model / "config.json").read_text())
    check_base_config(config)
    named = [NamedAdapter(name or default_name(adapter), str(adapter), alpha_tilde, alpha_0)]
    for other_name, spec in (more or {}).items():
        spec = dict(spec) if isinstance(spec, Mapping) else {"adapter": spec}
        _refuse_unknown(spec, NamedAdapter, f"the adapter {other_name!r}")
        folder = Path(spec.pop("adapter")).expanduser().resolve()
        named.append(NamedAdapter(other_name, str(folder), **spec))
    for served in named:
        mismatch = _recorded_base_mismatch(read_qadapter_config(Path(served.adapter)).base_model, config)
        if mismatch is not None:
            raise ValueError(f"the adapter {served.adapter} was trained on another base model: {mismatch}")
        served.policy(load_served_adapter(served.adapter, decoder_shapes(config)).policy)  # every check, now
    settings = ServingSettings(adapters=tuple(named), enabled=enabled, base_name=base_name)
    routes = ServingSettings.from_hf_config({SECTION: settings.to_dict()}).routes()  # the section's own checks
    os.environ[ROUTES_ENV] = json.dumps(routes)
    return {"model": str(model), "tokenizer": str(model), "logits_processors": [ROUTING_PROCESSOR],
            "hf_overrides": {"architectures": [ARCHITECTURE], SECTION: settings.to_dict()}}
