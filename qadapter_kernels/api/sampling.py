"""The public decoding functions with their argument checks: combined logits and one token per row
from the customised policy, from logits or from hidden states and the LM head.

Sampling is never differentiated: inputs that require grad are read without building a graph.
Each call costs one host sync (the range of per-row tensor parameters and the rows without a finite
maximum, read together after the kernel); a second only to name the row it then raises for.
"""
import numbers
from typing import NamedTuple

import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.sampling import combined_logits_rows, sample_from_hidden_rows, sample_rows
from ..ops.triton_helpers import plan_tiles
from ..params import INT_RANGES, RANGES, PolicyParams, SamplingParams, resolve, split_overrides, with_param_keywords
from .checks import (
    ZERO_ALPHA_0_NOTE,
    check_float_tensor,
    check_hidden_and_head,
    check_logits_pair,
    check_same_device,
    nonfinite_message,
    raise_on_flags,
    read_checks,
    tile_budget,
    value_checks_enabled,
)


class RowSampling(NamedTuple):
    """Validated sampling parameters as [B] tensors (top_k int64, the rest fp32): the ops' layout."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor


_ROW_DTYPES = {"temperature": torch.float32, "top_k": torch.long, "top_p": torch.float32, "min_p": torch.float32}


def _as_rows(name: str, value, rows: int, device: torch.device, flags: dict | None) -> torch.Tensor:
    """A validated scalar, or a [B] tensor whose range check joins ``flags``, as a [B] tensor."""
    dtype = _ROW_DTYPES[name]
    if not isinstance(value, torch.Tensor):
        return _scalar_rows(name, value, rows, dtype, device)
    check_same_device("q_logits", device, **{name: value})
    if value.dim() != 1 or value.shape[0] != rows:
        raise ValueError(f"{name} must be a scalar or a [B] tensor with B = {rows}, got {list(value.shape)}")
    integer = name in INT_RANGES
    if integer and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must hold integers, got {value.dtype}")
    if flags is not None:
        low, high, low_open = (*INT_RANGES[name], False) if integer else RANGES[name]
        wide = value.double()  # an fp32 comparison would round bounds like 1 - 1e-12 to 1
        below = (wide <= low) if low_open else (wide < low)
        bracket = "(" if low_open else "["
        flags[f"{name} must lie in {bracket}{low}, {high}] in every row"] = (
            below | (wide > high) | ~torch.isfinite(wide)).any()
    return value.detach().to(dtype).contiguous()


_SCALAR_ROWS: dict[tuple, torch.Tensor] = {}
_SCALAR_ROWS_LIMIT = 256


def _scalar_rows(name: str, value, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [B] tensor filled with a validated scalar. The ops only read it, so one tensor serves every
    call with the same value and batch size (a decoder asks for it at every token)."""
    if torch.compiler.is_compiling():
        return torch.full((rows,), value, dtype=dtype, device=device)
    key = (name, value, rows, device)
    if key not in _SCALAR_ROWS:
        if len(_SCALAR_ROWS) >= _SCALAR_ROWS_LIMIT:
            _SCALAR_ROWS.clear()
        _SCALAR_ROWS[key] = torch.full((rows,), value, dtype=dtype, device=device)
    return _SCALAR_ROWS[key]


def row_sampling(rows: int, device: torch.device, sampling: SamplingParams,
                 flags: dict | None) -> RowSampling:
    """``sampling`` (already resolved) as [B] tensors; the range flags of tensor fields join ``flags``."""
    return RowSampling(*(_as_rows(name, getattr(sampling, name), rows, device, flags) for name in RowSampling._fields))


@with_param_keywords(SamplingParams)
def check_sampling_parameters(rows: int, device: torch.device, sampling: SamplingParams | None = None,
                              **overrides) -> RowSampling:
    """Validates sampling parameters once (one host sync when a field is a tensor, else none) and
    returns them as the [B] tensors the unchecked samplers take (for ``generate``, which then
    samples every token without checking them again, and for callers that want bad arguments
    reported before a slow step such as a prefill)."""
    flags = {} if value_checks_enabled(device) else None
    per_row = row_sampling(rows, device, resolve(SamplingParams, sampling, overrides), flags)
    raise_on_flags(flags or {})
    return per_row


def as_generator(generator, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator(device).manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def draw_uniforms(rows: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """The [B] uniforms of the inverse-CDF draws, from the caller's generator (the ops stay pure)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(rows, generator=generator, device=gen_device).to(device)


def raise_on_sampling_flags(flags: dict | None, tokens: torch.Tensor, source: str, alpha_0: float) -> None:
    """Raises ValueError for a range flag (0-dim bool) that is set, else for the first row without a
    finite maximum (token -1), naming ``source``: one host sync (a second, for the row's index, only
    on the error path). ``flags`` None: checks are off."""
    if flags is None:
        return
    checks = list(flags.values())
    if tokens.numel():
        checks.append(tokens.amin())
    if not checks:
        return
    values = read_checks(checks)
    for message, bad in zip(flags, values):
        if bad:
            raise ValueError(message)
    if tokens.numel() and values[-1] < 0:
        row = int((tokens < 0).long().argmax())
        note = ZERO_ALPHA_0_NOTE if alpha_0 == 0 else ""
        raise ValueError(f"{source}: row {row} is all -inf or holds NaN or +inf{note}")


def _untracked(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as sampling reads it: never part of an autograd graph (sampling has no gradient)."""
    return t.detach() if t is not None and t.requires_grad else t


def _base_for_fp32_kernels(base_logits: torch.Tensor, alpha_0: float) -> torch.Tensor:
    """fp64 base logits as the fp32 kernels must read them. With ``alpha_0 = 0`` they enter only as
    ``0 * L``, which is 0 for any finite fp64 value, a mask at ``finfo(float64).min`` included; cast
    to fp32 such a value is -inf and ``0 * -inf`` NaN. So there finite values beyond fp32's range
    saturate at its largest magnitude (with ``alpha_0 > 0`` the cast's -inf is what the fp64 result
    rounds to anyway). Sampling and combined logits take no gradient in the base logits."""
    if base_logits.dtype != torch.float64 or alpha_0 != 0:
        return base_logits
    largest = torch.finfo(torch.float32).max
    return torch.where(torch.isfinite(base_logits), base_logits.clamp(-largest, largest), base_logits)


def sample_logits_rows(q_logits, base_logits, policy: PolicyParams, per_row: RowSampling, generator,
                       backend: str) -> torch.Tensor:
    """One token per row of [B, V] logits on a resolved backend; -1 for a row without a finite maximum. No checks."""
    q_logits, base_logits = _untracked(q_logits), _untracked(base_logits)
    if backend == "torch":
        y = q_logits.float() + policy.alpha_0 * base_logits.float()  # the row shift of log_softmax changes nothing
        no_finite_max = ~torch.isfinite(y.amax(-1)) | torch.isnan(y).any(-1)
        # torch.multinomial would fail on such rows: they get a uniform row, then -1 as from the kernels.
        safe = torch.where(no_finite_max[:, None], 0.0, q_logits.float())
        tokens = reference.combined_sample(safe, torch.where(no_finite_max[:, None], 0.0, base_logits.float()),
                                           policy, SamplingParams(*per_row), generator=generator)
        return torch.where(no_finite_max, -1, tokens)
    uniforms = draw_uniforms(q_logits.shape[0], q_logits.device, generator)
    return sample_rows(q_logits, _base_for_fp32_kernels(base_logits, policy.alpha_0), uniforms, *per_row,
                       policy.alpha_tilde, policy.alpha_0, through_dispatcher(backend, q_logits.device))


def sample_hidden_rows(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, policy: PolicyParams,
                       per_row: RowSampling, generator, backend: str, budget_mb: float,
                       two_stream: bool = False) -> torch.Tensor:
    """``sample_logits_rows`` from [B, H] hidden states and the LM head (one product on h_c, or with
    ``two_stream`` the adapter and base rows in one product per W tile); no checks."""
    ha, hb, w, b = map(_untracked, (adapter_hidden, base_hidden, lm_head_weight, lm_head_bias))
    if backend == "torch":
        logits = lambda h: torch.nn.functional.linear(h, w, b)  # noqa: E731
        return sample_logits_rows(logits(ha), logits(hb), policy, per_row, generator, backend)
    rows, hidden = ha.shape
    _, tile_vocab = plan_tiles(rows, hidden, w.shape[0], w.dtype, True, budget_mb)
    return sample_from_hidden_rows(ha, hb, w, b, draw_uniforms(rows, ha.device, generator), *per_row,
                                   policy.alpha_tilde, policy.alpha_0, tile_vocab,
                                   through_dispatcher(backend, ha.device), two_stream)


def _check_rows(q_logits, base_logits) -> None:
    check_logits_pair(q_logits, base_logits)
    if q_logits.dim() != 2:
        raise ValueError(f"q_logits must be [B, V], got {list(q_logits.shape)}")


@with_param_keywords(PolicyParams)
def combined_logits(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    params: PolicyParams | None = None,
    *,
    backend: str | None = None,
    **overrides,
) -> torch.Tensor:
    """``(Q + alpha_0 * log_softmax(L)) / alpha_tilde`` as fp32 ``[B, V]``: the customised policy's logits.

    Differentiable in ``q_logits``. NaN or +inf in either input, or a row with no finite entry, is a
    ValueError (one host sync; skipped under torch.compile and CUDA-graph capture).

    Args:
        q_logits: ``[B, V]`` adapter logits.
        base_logits: ``[B, V]`` base logits, same dtype.
        params: a ``PolicyParams`` (None: the defaults); ``alpha_tilde``, ``alpha_0`` override it.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (the reference).
    """
    _check_rows(q_logits, base_logits)
    p = resolve(PolicyParams, params, overrides)
    backend = resolve_backend(backend, q_logits.device)
    if backend == "torch":
        out = reference.combined_logits(q_logits, base_logits, p).float()
    else:
        out = combined_logits_rows(q_logits, _base_for_fp32_kernels(base_logits, p.alpha_0), p.alpha_tilde,
                                   p.alpha_0, through_dispatcher(backend, q_logits.device))
    if value_checks_enabled(q_logits.device) and out.numel():
        # NaN or +inf anywhere, or a row of -inf, leaves a row without a finite maximum.
        raise_on_flags({nonfinite_message("q_logits or base_logits", p.alpha_0):
                        ~torch.isfinite(out.detach().amax(-1)).all()})
    return out


@with_param_keywords(PolicyParams, SamplingParams)
def combined_sample(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    params: PolicyParams | None = None,
    sampling: SamplingParams | None = None,
    *,
    generator: torch.Generator | int | None = None,
    backend: str | None = None,
    **overrides,
) -> torch.Tensor:
    """One token per row from the customised policy, filtered as Hugging Face ``generate`` does.

    Args:
        q_logits: ``[B, V]`` adapter logits of the last position.
        base_logits: ``[B, V]`` base logits of the last position.
        params: a ``PolicyParams`` (None: the defaults); ``alpha_tilde``, ``alpha_0`` override it.
        sampling: a ``SamplingParams`` (None: the defaults); these keywords override it:
            temperature >= 0 (0 decodes greedily, ties to the lowest index); top_k: keep the k most
            likely (0: off); top_p: nucleus mass in (0, 1] (1: off); min_p: drop tokens below min_p
            times the top probability, in [0, 1) (0: off). Each a Python scalar or a per-row ``[B]`` tensor.
        generator: a ``torch.Generator`` or an int seed for reproducible draws.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (sort + multinomial).

    Returns:
        LongTensor ``[B]``.
    """
    _check_rows(q_logits, base_logits)
    policy_overrides, sampling_overrides = split_overrides(overrides)
    policy = resolve(PolicyParams, params, policy_overrides)
    sampling = resolve(SamplingParams, sampling, sampling_overrides)
    device = q_logits.device
    backend = resolve_backend(backend, device)
    flags = {} if value_checks_enabled(device) else None
    per_row = row_sampling(q_logits.shape[0], device, sampling, flags)
    tokens = sample_logits_rows(q_logits, base_logits, policy, per_row, as_generator(generator, device), backend)
    raise_on_sampling_flags(flags, tokens, "q_logits or base_logits", policy.alpha_0)
    return tokens


@with_param_keywords(PolicyParams, SamplingParams)
def combined_sample_from_hidden(
    adapter_hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    params: PolicyParams | None = None,
    sampling: SamplingParams | None = None,
    *,
    generator: torch.Generator | int | None = None,
    backend: str | None = None,
    tile_budget_mb: float | None = None,
    two_stream: bool = False,
    **overrides,
) -> torch.Tensor:
    """``combined_sample`` from the last hidden states ``[B, H]`` and the shared LM head ``[V, H]``.

    The head is applied ONCE, to ``h_c = (h_q + alpha_0 h_b) / alpha_tilde`` with bias
    ``b (1 + alpha_0) / alpha_tilde`` (docs/DESIGN.md §1 (the logit identity): the same policy, half the FLOPs of two
    logits rows). ``two_stream=True`` instead multiplies each W tile by both streams' rows (the
    authors' two heads; same distribution, for comparison). Either way W is read once and no
    logits row is stored (only the combined row, fp32). Tensors that require grad
    (``model.lm_head.weight``) are fine.
    """
    check_float_tensor("adapter_hidden", adapter_hidden)
    if adapter_hidden.dim() != 2:
        raise ValueError(f"adapter_hidden must be [B, H], got {list(adapter_hidden.shape)}")
    check_hidden_and_head(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias)
    policy_overrides, sampling_overrides = split_overrides(overrides)
    policy = resolve(PolicyParams, params, policy_overrides)
    sampling = resolve(SamplingParams, sampling, sampling_overrides)
    budget = tile_budget(tile_budget_mb)
    device = adapter_hidden.device
    backend = resolve_backend(backend, device)
    flags = {} if value_checks_enabled(device) else None
    per_row = row_sampling(adapter_hidden.shape[0], device, sampling, flags)
    if not isinstance(two_stream, bool):
        raise TypeError(f"two_stream must be a bool, got {type(two_stream).__name__}")
    tokens = sample_hidden_rows(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, policy, per_row,
                                as_generator(generator, device), backend, budget, two_stream)
    raise_on_sampling_flags(flags, tokens, "adapter_hidden, base_hidden or lm_head_weight", policy.alpha_0)
    return tokens
