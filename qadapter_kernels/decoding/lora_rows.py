"""Row blocks through their adapters by slicing: the mixed batch's routing without peft's index lists.

A mixed batch (``streams.MixedBatchStreams``, the policy scorer, the logits processor) stacks the
streams as contiguous blocks of rows: B rows per adapter, then B rows with none. peft's own
routing (``adapter_names=[...]``) builds Python index lists in every LoRA layer at every forward,
then gathers the sub-batch and scatters the delta back; at decode sizes that costs more than the
LoRA product itself (SmolLM2's q_proj, 16 rows, one thread: 320 us against 190 us sliced, the
base product alone 150 us), in each of the model's LoRA layers at every token. Here each layer
adds its adapter's delta to a view of its block of rows instead: the same arithmetic as peft's
vanilla LoRA (``lora_B(lora_A(dropout(x))) * scaling``, cast as peft casts), in the same order.

Only where that is the whole story: every adapter layer a plain ``peft`` ``lora.Linear``, unmerged,
no DoRA or other variant among the adapters routed (with adapters disabled, as peft does, none), no
``modules_to_save`` or trainable-token copies.
Anything else keeps peft's routing (``sliced_lora_routing`` returns None). The routing holds in the
calling thread only (``scoped_forward``), so threads decoding different adapters of one model at
once each get their own rows; peft's routing and its ``disable_adapter()`` set state every thread sees.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

from .scoped_forward import ModuleScope, install_forward

BASE_ADAPTER_NAME = "__base__"  # peft's name for "no adapter" in a mixed batch
Block = tuple[str, int, int]  # adapter name, first row, one past the last row


def row_blocks(adapter_names: Sequence[str]) -> list[Block]:
    """The runs of equal names, in order: ``["a", "a", "b"]`` -> ``[("a", 0, 2), ("b", 2, 3)]``."""
    blocks: list[Block] = []
    for row, name in enumerate(adapter_names):
        if blocks and blocks[-1][0] == name:
            blocks[-1] = (name, blocks[-1][1], row + 1)
        else:
            blocks.append((name, row, row + 1))
    return blocks


def sliced_lora_routing(peft_model, adapter_names: Sequence[str] | None) -> contextlib.AbstractContextManager | None:
    """A context in which row ``i`` of every forward runs through adapter ``adapter_names[i]`` (peft's
    ``"__base__"``, or a layer the adapter does not target: none), by slicing; with ``adapter_names=None``
    every row of any batch runs without an adapter. In this thread only: other threads using the model
    meanwhile (with a routing of their own, or none) are unaffected. Returns None where peft's routing
    is needed. An adapter the model does not have is a ValueError, as in peft."""
    names = [BASE_ADAPTER_NAME] if adapter_names is None else adapter_names
    unknown = sorted(set(names) - set(peft_model.peft_config) - {BASE_ADAPTER_NAME})
    if unknown:
        raise ValueError(f"adapter_names: the model has no adapter {', '.join(map(repr, unknown))} "
                         f"(it has {', '.join(map(repr, peft_model.peft_config))})")
    blocks = row_blocks(names)
    routed = {name for name, _, _ in blocks}
    if len(blocks) != len(routed):
        return None  # a name in two runs: not the stacked layout this serves
    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    if any(type(m) is not LoraLinear or m.merged or routed & set(m.lora_variant) for m in layers):
        return None
    if any(isinstance(m, AuxiliaryTrainingWrapper) for m in peft_model.modules()):
        return None  # modules_to_save or trainable tokens: peft routes (and disables) those too
    if not all([install_forward(m, _routed_forward) for m in layers]):
        return None  # a forward someone else set on a layer
    route = _Route(blocks, None if adapter_names is None else len(adapter_names))
    return _ROUTES.entered(layers, route)


class _Route(NamedTuple):
    blocks: list[Block]
    rows: int | None  # None: any number of rows, none with an adapter


_ROUTES = ModuleScope("sliced_lora_routing")


def _routed_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    route = _ROUTES.get(self)
    if route is None:  # outside every routing block of this thread: peft's own forward
        return LoraLinear.forward(self, x, *args, **kwargs)
    if route.rows is not None and x.shape[0] != route.rows:
        raise ValueError(f"adapter_names routes {route.rows} rows, but this forward has {x.shape[0]}")
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:  # peft's disable_adapter() inside the block: the base model, as in peft
        return result
    for name, start, stop in route.blocks:
        if name not in self.lora_A:
            continue
        # peft's lora_B(lora_A(dropout(x))) * scaling, as functions: at a decode step's few rows the three
        # module calls cost more than their products (dropout is the identity out of training).
        weight_a = self.lora_A[name].weight
        sub = x[start:stop].to(weight_a.dtype)
        if self.training:
            sub = self.lora_dropout[name](sub)
        lora_B = self.lora_B[name]
        delta = F.linear(F.linear(sub, weight_a), lora_B.weight, lora_B.bias).mul_(self.scaling[name])
        result[start:stop] += delta.to(result.dtype)
    return result
