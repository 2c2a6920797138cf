"""Several Q-Adapters at once: the composed policy and how one decoding step samples from it.

Adapters trained separately on the same base model combine at decode as

    pi~ ∝ exp((sum_i w_i Q_i + alpha_0 log pi_1) / alpha_tilde)

(docs/DESIGN.md §1, composing adapters). With a plain shared head (``Q_i = W h_i + b``,
``L = W h_b + b``) and ``m = sum_i w_i + alpha_0``, the exponent is, up to a constant per row,

    (W (sum_i w_i h_i + alpha_0 h_b) + m b) / alpha_tilde = c (W h_mix + b)
    h_mix = (sum_i w_i h_i + alpha_0 h_b) / m,      c = m / alpha_tilde

so the policy is the LM head on one mixed hidden state at inverse temperature ``c``: one head
product per row, through ``combined_sample_from_hidden`` with alpha_tilde = 1, alpha_0 = 0 and the
row's temperature divided by ``c`` (the bias is scaled by ``m / alpha_tilde`` with it; ``c`` is per
row because the weights are). Where the identity does not hold, or with ``two_pass``, the step
combines real logits rows instead: ``sum_i w_i Q_i`` and ``L`` through ``combined_sample``.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..api.unchecked import RowSampling, sample_hidden_rows, sample_logits_rows
from ..params import PLAIN_POLICY, PolicyParams, check_scalar

__all__ = ["AdapterWeight", "Composition", "check_adapter_weights", "composition"]

AdapterWeight = float | torch.Tensor


def check_adapter_weights(adapters: object, loaded: Sequence[str]) -> dict[str, AdapterWeight]:
    """``adapters`` ({adapter name: weight}) checked without reading tensor values: every name is one
    of the ``loaded`` adapters, every weight a finite real or a 1-D real tensor."""
    if not isinstance(adapters, Mapping) or not adapters:
        raise TypeError(f"adapters must be a non-empty dict {{adapter name: weight}}, got {adapters!r}")
    for name, weight in adapters.items():
        if name not in loaded:
            raise ValueError(f"adapters: no adapter named {name!r} is loaded (loaded: {list(loaded)}); load one "
                             "with QAdapterModel.load_adapter(directory, name=...)")
        label = f"adapters[{name!r}]"
        if isinstance(weight, torch.Tensor):
            if weight.is_complex() or weight.dtype == torch.bool:
                raise TypeError(f"{label} must hold real weights, got {weight.dtype}")
            if weight.dim() != 1:
                raise ValueError(f"{label} must be a number or a [B] tensor (one weight per row), "
                                 f"got shape {list(weight.shape)}")
        elif not isinstance(weight, numbers.Real) or isinstance(weight, bool):
            raise TypeError(f"{label} must be a number or a [B] tensor, got {type(weight).__name__}")
        else:
            check_scalar(label, weight, -float("inf"), float("inf"))
    return dict(adapters)


@dataclass(frozen=True)
class Composition:
    """The adapters that carry weight in some row, their per-row weights, and the policy's scale.

    ``weights`` [K, B, 1] and ``mass`` [B] = sum_i w_i + alpha_0 (> 0) in fp64;
    ``scale`` [B] = mass / alpha_tilde.
    """

    names: tuple[str, ...]
    weights: torch.Tensor
    mass: torch.Tensor
    policy: PolicyParams

    @property
    def scale(self) -> torch.Tensor:
        return self.mass / self.policy.alpha_tilde

    def mixed_hidden(self, adapter_hidden: Sequence[torch.Tensor], base_hidden: torch.Tensor) -> torch.Tensor:
        """h_mix [B, H] = (sum_i w_i h_i + alpha_0 h_b) / mass, in fp32 (fp64 for fp64 states)."""
        dtype = torch.promote_types(base_hidden.dtype, torch.float32)
        total = self.policy.alpha_0 * base_hidden.to(dtype)
        for weight, hidden in zip(self.weights, adapter_hidden):
            total = total + weight.to(dtype) * hidden.to(dtype)
        return total / self.mass.to(dtype)[:, None]

    def q_logits(self, adapter_logits: Sequence[torch.Tensor], base_logits: torch.Tensor) -> torch.Tensor:
        """sum_i w_i Q_i [B, V] (zeros when no adapter carries weight), in fp32 (fp64 for fp64 logits).

        A weight of 0 turns its adapter off in that row even where its logits are -inf (not 0 * -inf = NaN).
        """
        dtype = torch.promote_types(base_logits.dtype, torch.float32)
        total = torch.zeros(base_logits.shape, dtype=dtype, device=base_logits.device)
        for weight, logits in zip(self.weights, adapter_logits):
            weight = weight.to(dtype)
            total = total + torch.where(weight != 0, weight * logits.to(dtype), 0.0)
        return total

    def head_sampling(self, per_row: RowSampling) -> RowSampling:
        """``per_row`` for sampling the plain head on h_mix: each row's temperature divided by its scale."""
        return per_row._replace(temperature=(per_row.temperature / self.scale).float().contiguous())

    def sample(self, streams: Sequence[torch.Tensor], lm_head_weight: torch.Tensor, lm_head_bias, per_row: RowSampling,
               head_rows: RowSampling, generator, backend: str, budget_mb: float, mode: str) -> torch.Tensor:
        """One token per row from the step's ``streams`` (adapters' then the base's; no checks).

        ``mode``: "mixed" samples the head on h_mix (the streams are hidden states); "heads" applies
        the head to each stream's hidden state and combines the logits rows; "logits": the streams
        are logits rows already. ``head_rows`` is ``head_sampling(per_row)``, computed once per call.
        """
        *adapters, base = streams
        if mode == "mixed":
            mixed = self.mixed_hidden(adapters, base).to(lm_head_weight.dtype)
            # The head product on h_mix is the whole policy: the scale c travels in the temperature.
            return sample_hidden_rows(mixed, mixed, lm_head_weight, lm_head_bias, PLAIN_POLICY, head_rows, generator,
                                      backend, budget_mb)
        if mode == "heads":
            *adapters, base = (F.linear(h.to(lm_head_weight.dtype), lm_head_weight, lm_head_bias) for h in streams)
        return sample_logits_rows(self.q_logits(adapters, base), base, self.policy, per_row, generator, backend)


def composition(adapters: Mapping[str, AdapterWeight], rows: int, device: torch.device,
                policy: PolicyParams) -> Composition:
    """The ``Composition`` of checked ``adapters`` (``check_adapter_weights``) for a batch of ``rows``.

    Tensor weights are range-checked in one host sync: finite, and in every row
    ``sum_i w_i + alpha_0 > 0`` (else the policy has no scale: all weights 0 with alpha_0 = 0 would
    be uniform over the vocabulary). Adapters whose weight is 0 in every row are left out.
    """
    columns = []
    for name, weight in adapters.items():
        if isinstance(weight, torch.Tensor):
            if weight.shape[0] != rows:
                raise ValueError(f"adapters[{name!r}] must be a number or a [B] tensor with B = {rows}, "
                                 f"got {list(weight.shape)}")
            if weight.device != device:
                raise ValueError(f"adapters[{name!r}] is on {weight.device}, input_ids on {device}")
            columns.append(weight.detach().double())
        else:
            columns.append(torch.full((rows,), float(weight), dtype=torch.float64, device=device))
    weights = torch.stack(columns)
    mass = weights.sum(0) + policy.alpha_0
    bad_mass = mass <= 0
    flags = torch.cat([~torch.isfinite(weights).all(1), torch.where(bad_mass.any(), bad_mass.long().argmax(), -1)[None],
                       (weights != 0).any(1)]).long().tolist()
    names = list(adapters)
    nonfinite = [name for name, flag in zip(names, flags[: len(names)]) if flag]
    if nonfinite:
        raise ValueError(f"adapters[{nonfinite[0]!r}] must hold finite weights")
    if flags[len(names)] >= 0:
        row = flags[len(names)]
        raise ValueError(f"adapters: in row {row} the weights sum to {float(weights[:, row].sum()):g} and alpha_0 = "
                         f"{policy.alpha_0:g}; the composed policy needs sum(weights) + alpha_0 > 0 in every row")
    used = [i for i, flag in enumerate(flags[len(names) + 1:]) if flag]
    return Composition(names=tuple(names[i] for i in used), weights=weights[used][:, :, None], mass=mass,
                       policy=policy)
