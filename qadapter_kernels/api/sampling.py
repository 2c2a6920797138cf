"""The public decoding functions with their argument checks: combined logits and one token per row
from the customised policy, from logits or from hidden states and the LM head."""
import numbers

import torch

from .. import reference
from ..ops.backend import resolve_backend, through_dispatcher
from ..ops.sampling import combined_logits_rows, sample_from_hidden_rows, sample_rows
from ..ops.triton_helpers import plan_tiles
from ..params import check_scalar
from .checks import (
    check_alphas,
    check_float_tensor,
    check_hidden_and_head,
    check_logits_pair,
    check_same_device,
    tile_budget,
    value_checks_enabled,
)


def _row_parameter(name, value, rows, dtype, device, low, high, low_open=False, integer=False, flags=None):
    """A scalar or a [B] tensor of per-row values as a [B] tensor.

    A tensor's range is not synced here: its flag goes into `flags` (message -> 0-dim bool),
    checked with the rest of the call's value checks in one host sync.
    """
    if isinstance(value, torch.Tensor):
        check_same_device("q_logits", device, **{name: value})
        if value.dim() != 1 or value.shape[0] != rows:
            raise ValueError(f"{name} must be a scalar or a [B] tensor with B = {rows}, got {list(value.shape)}")
        if integer and (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"{name} must hold integers, got {value.dtype}")
        if flags is not None:
            wide = value.double()  # an fp32 comparison would round bounds like 1 - 1e-12 to 1
            below = (wide <= low) if low_open else (wide < low)
            bracket = "(" if low_open else "["
            flags[f"{name} must lie in {bracket}{low}, {high}] in every row"] = (
                below | (wide > high) | ~torch.isfinite(wide)).any()
        return value.to(dtype).contiguous()
    if integer:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int or a [B] tensor, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    else:
        value = check_scalar(name, value, low, high, low_open)
    return torch.full((rows,), value, dtype=dtype, device=device)


def as_generator(generator, device: torch.device) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator(device).manual_seed(int(generator))
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _draw_uniforms(rows: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(rows, generator=generator, device=gen_device).to(device)


def _row_parameters(rows, device, temperature, top_k, top_p, min_p):
    """(temperature, top_k, top_p, min_p) as [B] tensors, and the range flags of tensor arguments."""
    flags = {} if value_checks_enabled(device) else None
    per_row = (
        _row_parameter("temperature", temperature, rows, torch.float32, device, 0.0, float("inf"), flags=flags),
        _row_parameter("top_k", top_k, rows, torch.long, device, 0, 2**62, integer=True, flags=flags),
        _row_parameter("top_p", top_p, rows, torch.float32, device, 0.0, 1.0, low_open=True, flags=flags),
        _row_parameter("min_p", min_p, rows, torch.float32, device, 0.0, 1.0 - 1e-12, flags=flags),
    )
    return per_row, flags


def _sampling_arguments(rows, device, temperature, top_k, top_p, min_p, generator):
    """(uniforms, temperature, top_k, top_p, min_p) as [B] tensors, and the range flags of tensor arguments."""
    per_row, flags = _row_parameters(rows, device, temperature, top_k, top_p, min_p)
    return (_draw_uniforms(rows, device, generator), *per_row), flags


def check_sampling_parameters(rows: int, device: torch.device, temperature: float | torch.Tensor = 1.0,
                              top_k: int | torch.Tensor = 0, top_p: float | torch.Tensor = 1.0,
                              min_p: float | torch.Tensor = 0.0) -> None:
    """Raises the error the samplers would raise for these parameters, without sampling (for
    callers that want bad arguments reported before a slow step, such as a prefill)."""
    _check_sampling(_row_parameters(rows, device, temperature, top_k, top_p, min_p)[1], None, "")


def _check_sampling(flags: dict | None, tokens: torch.Tensor | None, source: str) -> None:
    """The argument flags and the rows without a finite maximum (token -1) in one host sync."""
    if flags is None:  # compiling or capturing a CUDA graph
        return
    checks = [f.reshape(()).long() for f in flags.values()]
    if tokens is not None and tokens.numel():
        bad = tokens < 0
        checks.append(torch.where(bad.any(), bad.long().argmax(), -1))  # the first bad row, or -1
    values = torch.stack(checks).tolist() if checks else []
    for message, failed in zip(flags, values):
        if failed:
            raise ValueError(message)
    if len(values) > len(flags) and values[-1] >= 0:
        raise ValueError(f"{source}: row {values[-1]} is all -inf or holds NaN or +inf")


def _check_rows(q_logits, base_logits, alpha_tilde, alpha_0):
    check_logits_pair(q_logits, base_logits)
    if q_logits.dim() != 2:
        raise ValueError(f"q_logits must be [B, V], got {list(q_logits.shape)}")
    return check_alphas(alpha_tilde, alpha_0)


def combined_logits(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    backend: str | None = None,
) -> torch.Tensor:
    """``(Q + alpha_0 * log_softmax(L)) / alpha_tilde`` as fp32 ``[B, V]``: the customised policy's logits."""
    alpha_tilde, alpha_0 = _check_rows(q_logits, base_logits, alpha_tilde, alpha_0)
    backend = resolve_backend(backend, q_logits.device)
    if backend == "torch":
        return reference.combined_logits(q_logits, base_logits, alpha_tilde, alpha_0).float()
    return combined_logits_rows(q_logits, base_logits, alpha_tilde, alpha_0,
                                through_dispatcher(backend, q_logits.device))


def combined_sample(
    q_logits: torch.Tensor,
    base_logits: torch.Tensor,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One token per row from the customised policy, filtered as Hugging Face ``generate`` does.

    Args:
        q_logits, base_logits: ``[B, V]`` adapter and base logits of the last position.
        temperature: >= 0; 0 decodes greedily (ties to the lowest index).
        top_k: keep the k most likely (0: off); top_p: nucleus mass in (0, 1] (1: off);
        min_p: drop tokens below min_p times the top probability, in [0, 1) (0: off).
            Each a Python scalar or a per-row ``[B]`` tensor.
        generator: a ``torch.Generator`` or an int seed for reproducible draws.
        backend: None (C++ on CPU, Triton on CUDA), "cpu", "triton" or "torch" (sort + multinomial).

    Returns:
        LongTensor ``[B]``.
    """
    alpha_tilde, alpha_0 = _check_rows(q_logits, base_logits, alpha_tilde, alpha_0)
    backend = resolve_backend(backend, q_logits.device)
    rows = q_logits.shape[0]
    generator = as_generator(generator, q_logits.device)
    params, flags = _sampling_arguments(rows, q_logits.device, temperature, top_k, top_p, min_p, generator)
    if backend == "torch":
        # Checked before torch.multinomial can fail on them; -1 marks a row as the kernels do.
        y = q_logits.float() + alpha_0 * base_logits.float()  # the row shift of log_softmax changes nothing
        no_finite_max = ~torch.isfinite(y.amax(-1)) | torch.isnan(y).any(-1)
        _check_sampling(flags, torch.where(no_finite_max, -1, 0), "q_logits or base_logits")
        return reference.combined_sample(q_logits, base_logits, alpha_tilde, alpha_0, *params[1:],
                                         generator=generator)
    tokens = sample_rows(q_logits, base_logits, *params, alpha_tilde, alpha_0,
                         through_dispatcher(backend, q_logits.device))
    _check_sampling(flags, tokens, "q_logits or base_logits")
    return tokens


def combined_sample_from_hidden(
    adapter_hidden: torch.Tensor,
    base_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    alpha_tilde: float = 1.0,
    alpha_0: float = 0.01,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    min_p: float | torch.Tensor = 0.0,
    generator: torch.Generator | int | None = None,
    backend: str | None = None,
    tile_budget_mb: float | None = None,
) -> torch.Tensor:
    """``combined_sample`` from the last hidden states ``[B, H]`` and the shared LM head ``[V, H]``.

    Each W tile is read once for both streams and the two logits rows are never stored (only
    the combined row, fp32).
    """
    check_float_tensor("adapter_hidden", adapter_hidden)
    if adapter_hidden.dim() != 2:
        raise ValueError(f"adapter_hidden must be [B, H], got {list(adapter_hidden.shape)}")
    check_hidden_and_head(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias)
    alpha_tilde, alpha_0 = check_alphas(alpha_tilde, alpha_0)
    budget = tile_budget(tile_budget_mb)
    device = adapter_hidden.device
    backend = resolve_backend(backend, device)
    rows, hidden = adapter_hidden.shape
    vocab = lm_head_weight.shape[0]
    if backend == "torch":
        logits = lambda h: torch.nn.functional.linear(h, lm_head_weight, lm_head_bias)  # noqa: E731
        return combined_sample(logits(adapter_hidden), logits(base_hidden), alpha_tilde, alpha_0, temperature,
                               top_k, top_p, min_p, generator, backend="torch")
    params, flags = _sampling_arguments(rows, device, temperature, top_k, top_p, min_p,
                                        as_generator(generator, device))
    _, tile_vocab = plan_tiles(rows, hidden, vocab, lm_head_weight.dtype, True, budget)
    tokens = sample_from_hidden_rows(adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, *params, alpha_tilde,
                                     alpha_0, tile_vocab, through_dispatcher(backend, device))
    _check_sampling(flags, tokens, "adapter_hidden, base_hidden or lm_head_weight")
    return tokens
