"""What ``QAdapterTrainer`` accepts, turned into what it trains: a ``QAdapterModel`` from a model name,
path, causal LM, ``PeftModel`` or ``QAdapterModel`` (with a ``peft.LoraConfig``), and tokenised
preference pairs from the forms a TRL user's data comes in."""
from __future__ import annotations

import dataclasses
import logging
import os

import peft
import torch
from transformers import PreTrainedModel

from ..loading import load_base_model, load_tokenizer
from ..params import SequenceLimits
from .arguments import QAdapterTrainingArguments
from ..model import QAdapterConfig, QAdapterModel
from .data import DEFAULT_PROMPT_TRUNCATION, PreferenceDataset, PreferenceStream, as_preference_dataset
from .examples import PreferenceDataError

__all__ = ["ModelSource", "default_tokenizer", "disable_dropout", "lora_fields", "model_init_kwargs",
           "qadapter_model_from", "tokenized_preferences"]

logger = logging.getLogger(__name__)

ModelSource = str | os.PathLike | PreTrainedModel | peft.PeftModel | QAdapterModel


def lora_fields(peft_model: peft.PeftModel) -> dict:
    """The ``QAdapterConfig`` LoRA fields of the adapter peft actually built: r, alpha, dropout, and
    the names of the modules that got a LoRA (what ``target_modules="all-linear"`` or a regex became)."""
    lora = peft_model.peft_config[peft_model.active_adapter]
    targeted = sorted({name.rsplit(".", 1)[-1] for name in peft_model.targeted_module_names})
    return {"lora_r": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
            "target_modules": tuple(targeted)}


def _checked_lora_config(peft_config: object) -> peft.LoraConfig:
    if not isinstance(peft_config, peft.LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig (Q-Adapter's Q-function is a LoRA that can be "
                        f"switched off for the base pass), got {type(peft_config).__name__}")
    if peft_config.modules_to_save:
        # A trained copy of e.g. lm_head would differ between the two passes; the method shares the frozen head.
        raise ValueError(f"peft_config.modules_to_save must be empty (the LM head and embeddings stay shared "
                         f"and frozen), got {sorted(peft_config.modules_to_save)}")
    if peft_config.task_type is None:
        return dataclasses.replace(peft_config, task_type=peft.TaskType.CAUSAL_LM)
    if peft_config.task_type != peft.TaskType.CAUSAL_LM:
        raise ValueError(f"peft_config.task_type must be CAUSAL_LM (or None), got {peft_config.task_type}")
    return peft_config


def model_init_kwargs(model: ModelSource, args, quantization_config=None) -> dict:
    """The ``from_pretrained`` keywords for ``model`` as ``DPOTrainer`` builds them: ``args.model_init_kwargs``,
    ``args.trust_remote_code`` and ``quantization_config``. They apply to a model named by path or name only:
    ``ValueError`` when some are given with a model already loaded."""
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config is given both to the trainer and in args.model_init_kwargs: "
                             "give it once")
        kwargs["quantization_config"] = quantization_config
    if not isinstance(model, (str, os.PathLike)):
        if kwargs:
            raise ValueError(f"{sorted(kwargs)} (from args.model_init_kwargs or quantization_config) apply to a "
                             f"model named by path or name; model= is a loaded {type(model).__name__}: load it "
                             "with these settings instead")
        return {}
    if getattr(args, "trust_remote_code", False):
        kwargs.setdefault("trust_remote_code", True)
    return kwargs


def _is_quantized(model: PreTrainedModel) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def qadapter_model_from(model: ModelSource, config: QAdapterConfig | None, peft_config=None,
                        init_kwargs: dict | None = None) -> QAdapterModel:
    """A ``QAdapterModel`` for ``model``.

    ``config``: the hyper-parameters to train with (None: the model's own when it is a
    ``QAdapterModel``, else the defaults). ``peft_config``: the LoRA to put on a base model; a
    ``PeftModel`` or ``QAdapterModel`` already holds its adapter, so passing one too is an error.
    ``init_kwargs``: ``from_pretrained`` keywords for a model named by path or name (``model_init_kwargs``);
    a base loaded quantized is prepared for k-bit training as ``DPOTrainer`` does.
    """
    if isinstance(model, (QAdapterModel, peft.PeftModel)) and peft_config is not None:
        raise ValueError(f"model is a {type(model).__name__} that already holds its LoRA: pass peft_config=None")
    if isinstance(model, QAdapterModel):
        if config is not None:
            hyper = {f.name: getattr(config, f.name) for f in dataclasses.fields(config.params)}
            updated = dataclasses.replace(model.qadapter_config, **hyper, tile_budget_mb=config.tile_budget_mb)
            if updated != model.qadapter_config:
                logger.info("training with the arguments' Q-Adapter hyper-parameters, not the model's own: %s",
                            {k: v for k, v in hyper.items() if getattr(model.qadapter_config, k) != v})
            model.qadapter_config = updated.validate()
        return model
    config = config or QAdapterConfig()
    if isinstance(model, (str, os.PathLike)):
        config = dataclasses.replace(config, base_model=str(model))
        model = load_base_model(model, **(init_kwargs or {}))
        if _is_quantized(model):  # the Trainer turns gradient checkpointing on itself when asked
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if isinstance(model, PreTrainedModel) and peft_config is not None:
        model = peft.get_peft_model(model, _checked_lora_config(peft_config))
    if isinstance(model, peft.PeftModel):
        return QAdapterModel(model, dataclasses.replace(config, **lora_fields(model)))
    if isinstance(model, PreTrainedModel):
        return QAdapterModel(model, config)
    raise TypeError(f"model must be a model name or path, a transformers PreTrainedModel, a peft PeftModel or a "
                    f"QAdapterModel, got {type(model).__name__}")


def default_tokenizer(model: ModelSource, init_kwargs: dict | None = None):
    """The tokenizer saved with a model named by path or name (TRL's behaviour), loaded with the
    ``revision`` and ``trust_remote_code`` of ``init_kwargs``; None for a loaded model."""
    if isinstance(model, (str, os.PathLike)):
        init_kwargs = init_kwargs or {}
        return load_tokenizer(model, **{k: init_kwargs[k] for k in ("revision", "trust_remote_code")
                                        if k in init_kwargs})
    return None


def disable_dropout(model: QAdapterModel) -> None:
    """Every dropout probability of ``model`` set to 0 (LoRA's included, and recorded in its config)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.qadapter_config = dataclasses.replace(model.qadapter_config, lora_dropout=0.0)


def tokenized_preferences(data: object, tokenizer, name: str, args=None) -> torch.utils.data.Dataset | None:
    """``data`` as tokenised pairs for ``PreferenceCollator`` (None stays None; tokenised data is kept
    as it is), cut to the limits of ``args`` when it is a ``QAdapterTrainingArguments``.

    ``data``: anything ``data.as_preference_dataset`` reads (files, cached dataset names, rows,
    ``datasets`` objects; TRL's explicit and implicit formats). A bad row is a ``PreferenceDataError``
    naming ``name``, the row and the field.
    """
    if data is None or isinstance(data, (PreferenceDataset, PreferenceStream)):
        return data
    if tokenizer is None:
        raise ValueError(f"{name} needs tokenising: pass processing_class= (the tokenizer)")
    if isinstance(args, QAdapterTrainingArguments):
        limits, truncation = SequenceLimits(args.max_length, args.max_prompt_length), args.prompt_truncation
    else:
        limits, truncation = SequenceLimits(), DEFAULT_PROMPT_TRUNCATION
    try:
        return as_preference_dataset(data, tokenizer, limits.max_length, limits.max_prompt_length,
                                     prompt_truncation=truncation)
    except PreferenceDataError as e:
        raise PreferenceDataError(f"{name}: {e}") from None
