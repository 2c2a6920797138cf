"""The checks a saved adapter passes before it is used: safetensors only, readable, the same tensors
(names and shapes) as the adapter it is loaded into, and finite values."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors
import torch

if TYPE_CHECKING:
    import peft

__all__ = ["ADAPTER_WEIGHTS_NAME", "adapter_weights_file", "check_adapter_state", "check_finite_lora",
           "check_finite_tensors", "saved_tensor_shapes"]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLED_ADAPTER_NAME = "adapter_model.bin"
_SHOWN = 3  # names listed per kind of mismatch


def adapter_weights_file(directory: Path) -> Path:
    """The safetensors weights of an adapter folder; a pickled one is refused, never loaded."""
    weights = directory / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        return weights
    if (directory / _PICKLED_ADAPTER_NAME).exists():
        raise ValueError(
            f"{directory} holds {_PICKLED_ADAPTER_NAME} (pickle), which is never loaded: convert it to "
            f"{ADAPTER_WEIGHTS_NAME} with a tool you trust"
        )
    raise FileNotFoundError(f"{weights} not found")


def saved_tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header (ValueError if unreadable)."""
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file ({e})") from None
    if not shapes:
        raise ValueError(f"{weights} holds no tensors")
    return shapes


def check_adapter_state(peft_model: peft.PeftModel, weights: Path, adapter_name: str = "default") -> None:
    """The file holds exactly the tensors of adapter ``adapter_name``, each with its shape (ValueError
    naming the first few)."""
    import peft  # here: the file checks above serve the vLLM plug-in too, which needs no peft

    # save_embedding_layers=False as save_pretrained writes them: peft's "auto" would look for the base
    # model's config.json (absent beside a GGUF file), warn that it found none, and may ask the Hub.
    state = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    found = saved_tensor_shapes(weights)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or reshaped:
        parts = [f"{what} {names[:_SHOWN]}" + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
                 for what, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
                 if names]
        raise ValueError(f"{weights} does not match this adapter and base model: " + "; ".join(parts))


def check_finite_lora(peft_model: peft.PeftModel, weights: Path, adapter_name: str = "default") -> None:
    check_finite_tensors(((n, p) for n, p in peft_model.named_parameters()
                          if "lora_" in n and f".{adapter_name}." in n), weights)


def check_finite_tensors(named: Iterable[tuple[str, torch.Tensor]], weights: Path) -> None:
    """ValueError naming the first tensor loaded from ``weights`` that holds NaN or inf."""
    for name, tensor in named:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights} holds non-finite (NaN or inf) LoRA weights: {name}")
