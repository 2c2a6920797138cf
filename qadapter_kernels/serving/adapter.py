"""A saved Q-Adapter folder read for serving: its policy parameters and its LoRA as fused pairs.

vLLM's decoders (Llama, Mistral, Qwen2, Qwen3) fuse q/k/v into one ``qkv_proj`` and gate/up into
one ``gate_up_proj``. The LoRA of a fused projection becomes ONE low-rank pair: the A matrices stacked, the (scaled) B matrices
block-diagonal, so ``x @ A.T @ B.T`` yields the deltas of all its parts at once, side by side in
the fused output. Nothing here imports vLLM: the folder is checked before an engine starts.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..model.adapter_files import check_finite_tensors, saved_tensor_shapes
from ..model.config import QAdapterConfig
from ..params import PolicyParams

__all__ = ["COLUMN_PARALLEL", "FUSED_PROJECTIONS", "DecoderShapes", "LoraPair", "ServedAdapter", "load_served_adapter",
           "rank_share", "read_adapter_json", "read_qadapter_config"]

QADAPTER_CONFIG = "qadapter_config.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

# vLLM's fused projection -> the transformers modules it holds, in its output order.
FUSED_PROJECTIONS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
SUPPORTED_MODULES = tuple(m for parts in FUSED_PROJECTIONS.values() for m in parts)
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# peft options that change what a LoRA computes beyond ``scale * B @ A``.
_UNSUPPORTED_PEFT_OPTIONS = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                             "modules_to_save": None, "layer_replication": None, "alpha_pattern": {},
                             "rank_pattern": {}}


@dataclass(frozen=True)
class DecoderShapes:
    """The layer count and projection sizes a LoRA must match (the whole model, not one tensor-parallel rank)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    q_size: int
    kv_size: int
    head_dim: int

    def in_out(self, module: str) -> tuple[int, int]:
        return {"q_proj": (self.hidden_size, self.q_size), "k_proj": (self.hidden_size, self.kv_size),
                "v_proj": (self.hidden_size, self.kv_size), "o_proj": (self.q_size, self.hidden_size),
                "gate_proj": (self.hidden_size, self.intermediate_size),
                "up_proj": (self.hidden_size, self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size)}[module]

    def rank_slice(self, size: int, rank: int, world: int, *, kv: bool = False) -> slice:
        """The part of a projection's output (or input) of ``size`` that tensor-parallel ``rank`` of ``world``
        holds, as vLLM splits it: an equal share each; k/v heads fewer than the ranks are replicated, whole
        heads, ``world / heads`` ranks each."""
        heads = size // self.head_dim
        if kv and heads < world:
            if world % heads:
                raise ValueError(f"{heads} key/value heads cannot be replicated evenly over {world} ranks")
            head = rank // (world // heads)
            return slice(head * self.head_dim, (head + 1) * self.head_dim)
        if size % world:
            raise ValueError(f"a projection of size {size} cannot be split evenly over {world} tensor-parallel ranks")
        share = size // world
        return slice(rank * share, (rank + 1) * share)


@dataclass(frozen=True)
class LoraPair:
    """``delta(x) = (x @ a.T) @ b.T`` for one fused projection of one layer; the scale is in ``b``."""

    a: torch.Tensor  # [sum of ranks, in]
    b: torch.Tensor  # [fused out, sum of ranks], block-diagonal


# vLLM splits these projections' outputs across tensor-parallel ranks (column parallel); the others
# (o_proj, down_proj) their inputs, summing the ranks' products (row parallel).
COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")


def rank_share(pair: LoraPair, projection: str, shapes: DecoderShapes, rank: int, world: int) -> LoraPair:
    """The part of a fused ``projection``'s pair that tensor-parallel ``rank`` of ``world`` computes.

    Column parallel: every part's output rows of the rank (so its delta lands beside the rank's own
    output). Row parallel: ``a``'s input columns of the rank; the ranks' ``x @ a.T`` must be summed
    (all-reduced) before ``b``, which every rank holds whole.
    """
    if world == 1:
        return pair
    if projection not in COLUMN_PARALLEL:
        return LoraPair(pair.a[:, shapes.rank_slice(pair.a.shape[1], rank, world)].contiguous(), pair.b)
    rows, start = [], 0
    for module in FUSED_PROJECTIONS[projection]:
        out = shapes.in_out(module)[1]
        own = shapes.rank_slice(out, rank, world, kv=module in ("k_proj", "v_proj"))
        rows.append(pair.b[start + own.start:start + own.stop])
        start += out
    return LoraPair(pair.a, torch.cat(rows).contiguous())


@dataclass(frozen=True)
class ServedAdapter:
    """What a server needs from a Q-Adapter folder."""

    policy: PolicyParams
    base_model: str | None
    lora: dict[tuple[int, str], LoraPair]  # (layer, fused projection) -> pair; absent: no LoRA there


def read_adapter_json(path: Path) -> dict:
    """A JSON object file of an adapter folder; ValueError naming it when it is missing, not JSON or not an object."""
    if not path.is_file():
        raise ValueError(f"{path} not found: the adapter must be a folder saved by QAdapterModel.save_pretrained")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def read_qadapter_config(folder: Path) -> QAdapterConfig:
    """The adapter's ``qadapter_config.json``, parsed as the library does: a misspelt or unknown field, or a
    value out of range, is a ValueError naming the file."""
    path = folder / QADAPTER_CONFIG
    try:
        return QAdapterConfig.from_json(json.dumps(read_adapter_json(path)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _lora_scale(peft_config: dict, folder: Path) -> float:
    for option, plain in _UNSUPPORTED_PEFT_OPTIONS.items():
        if peft_config.get(option, plain) not in (plain, None):
            raise ValueError(f"{folder}: the LoRA uses {option}={peft_config[option]!r}; serving supports plain "
                             f"LoRA ({option}={plain!r})")
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {peft_config['peft_type']!r} is not LoRA")
    rank, alpha = peft_config.get("r"), peft_config.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{folder}/{PEFT_CONFIG}: needs an integer r >= 1 and a numeric lora_alpha")
    return alpha / math.sqrt(rank) if peft_config.get("use_rslora") else alpha / rank


def _lora_tensors(folder: Path, shapes: DecoderShapes) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer, module) -> {"A": [r, in], "B": [out, r]}, with every key and shape checked."""
    weights_file = folder / PEFT_WEIGHTS
    if not weights_file.is_file():
        raise ValueError(f"{weights_file} not found (only safetensors adapters are served; nothing is unpickled)")
    saved_tensor_shapes(weights_file)  # a truncated or foreign file: one line naming it
    loaded = safetensors.torch.load_file(str(weights_file))
    check_finite_tensors(loaded.items(), weights_file)  # a NaN would be served as NaN log-probs
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in loaded.items():
        match = _LORA_KEY.match(key)
        if match is None or match.group(2) not in SUPPORTED_MODULES:
            raise ValueError(f"{folder}: LoRA weight {key!r} is on a module the vLLM plug-in does not support "
                             f"(supported: the decoder layers' {', '.join(SUPPORTED_MODULES)}; a LoRA on the "
                             "embeddings or the LM head breaks the shared-head identity)")
        layer, module = int(match.group(1)), match.group(2)
        found.setdefault((layer, module), {})[match.group(3)] = tensor
    for (layer, module), pair in sorted(found.items()):
        if layer >= shapes.num_layers:
            raise ValueError(f"{folder}: the adapter has a LoRA on layer {layer}, the base model has "
                             f"{shapes.num_layers} layers: it was trained for another base model")
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{folder}: layer {layer} {module} has lora_{set(pair).pop()} without its partner")
        fan_in, fan_out = shapes.in_out(module)
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
            raise ValueError(f"{folder}: layer {layer} {module} LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                             f"do not fit the base model's {module} ({fan_in} -> {fan_out}): it was trained for "
                             "another base model")
    return found


def _fuse(parts: tuple[str, ...], layer: int, tensors: dict, shapes: DecoderShapes, scale: float,
          dtype: torch.dtype) -> LoraPair | None:
    present = [m for m in parts if (layer, m) in tensors]
    if not present:
        return None
    a = torch.cat([tensors[(layer, m)]["A"] for m in present]).to(dtype)
    b = torch.zeros(sum(shapes.in_out(m)[1] for m in parts), a.shape[0], dtype=dtype)
    row = col = 0
    for module in parts:
        out = shapes.in_out(module)[1]
        if module in present:
            block = tensors[(layer, module)]["B"]
            b[row:row + out, col:col + block.shape[1]] = block.to(dtype) * scale
            col += block.shape[1]
        row += out
    return LoraPair(a.contiguous(), b)


def load_served_adapter(folder: str | Path, shapes: DecoderShapes, dtype: torch.dtype = torch.float32) -> ServedAdapter:
    """Reads and checks an adapter folder against the base model's ``shapes``.

    ValueError (naming the folder and the cause) for a folder that is not a Q-Adapter, a LoRA on
    a module the plug-in does not support, a LoRA variant it cannot compute, or LoRA shapes of
    another base model.
    """
    folder = Path(folder)
    qadapter_config = read_qadapter_config(folder)
    policy = PolicyParams(alpha_tilde=qadapter_config.alpha_tilde, alpha_0=qadapter_config.alpha_0).validated()
    scale = _lora_scale(read_adapter_json(folder / PEFT_CONFIG), folder)
    tensors = _lora_tensors(folder, shapes)
    lora = {}
    for layer in range(shapes.num_layers):
        for fused, parts in FUSED_PROJECTIONS.items():
            pair = _fuse(parts, layer, tensors, shapes, scale, dtype)
            if pair is not None:
                lora[(layer, fused)] = pair
    return ServedAdapter(policy=policy, base_model=qadapter_config.base_model, lora=lora)
