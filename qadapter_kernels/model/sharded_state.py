"""Whole weights from a sharded model: the adapter for a save and a resume, the LM head for the loss.

Under FSDP every parameter is a shard (a DTensor under FSDP2), so the adapter cannot be read
from or written into the live parameters directly. accelerate's own FSDP save gathers the whole
model, frozen base included (it strips only a bare ``peft.PeftModel``); here only the trainable
(LoRA) parameters are gathered, and resume reads ``adapter_model.safetensors`` (never a pickle).
"""
from __future__ import annotations

from pathlib import Path

import peft
import safetensors.torch
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from .adapter_files import adapter_weights_file, check_adapter_state, check_finite_tensors

__all__ = ["gather_adapter_state", "load_adapter_state", "whole_parameters"]


def gather_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable parameters of ``model`` on the CPU of process 0, keyed as
    ``model.state_dict()``; the other processes get an empty dict. Every process must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def _parameter_names(peft_model: peft.PeftModel) -> dict[str, str]:
    """Name in an adapter file -> name of the parameter in ``peft_model``, by peft's own renaming rule."""
    names = [name for name, _ in peft_model.named_parameters()]
    tagged = {name: torch.tensor(i) for i, name in enumerate(names)}
    saved = peft.get_peft_model_state_dict(peft_model, state_dict=tagged)
    return {key: names[int(tag)] for key, tag in saved.items()}


def load_adapter_state(peft_model: peft.PeftModel, directory: str | Path) -> None:
    """Loads the adapter saved in ``directory`` into the sharded ``peft_model``; every process must call it."""
    weights_file = adapter_weights_file(Path(directory))
    check_adapter_state(peft_model, weights_file)
    saved = safetensors.torch.load_file(str(weights_file))
    check_finite_tensors(sorted(saved.items()), weights_file)
    names = _parameter_names(peft_model)
    state = {names[key]: tensor for key, tensor in saved.items()}
    set_model_state_dict(peft_model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def whole_parameters(*params: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``params`` whole, for a computation outside their module's forward (the fused loss reads the LM head).

    DeepSpeed ZeRO-3 partitions parameters, gathers one for the forward of a module that holds
    it and frees it afterwards, also under a tensor autograd saved for the backward. So each
    partitioned parameter (one with DeepSpeed's ``ds_id``) is copied whole, without grad (only
    frozen parameters may go through here), gathered first unless it is gathered already (a tied
    LM head is, by the embedding). Other parameters (plain, or FSDP's, which keeps the root
    group's parameters gathered from forward to backward) are returned as they are.
    """
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return params
    from deepspeed.runtime.zero import GatheredParameters, ZeroParamStatus  # DeepSpeed partitioned them

    missing = [p for p in partitioned if p.ds_status != ZeroParamStatus.AVAILABLE]
    with GatheredParameters(missing, enabled=bool(missing)):
        return tuple(None if p is None else p.detach().clone() if hasattr(p, "ds_id") else p for p in params)
