"""Decoding from the customised policy: combine, filter and sample in one fused pass per row.

    combined = (Q + alpha_0 * log_softmax(L)) / alpha_tilde
    temperature -> top_k -> top_p -> min_p -> sample      (Hugging Face's order; T = 0 is greedy)

log_softmax(L) shifts a row by a constant, which neither the filters nor the draw can see, so
the kernels work on y = (Q + alpha_0 * L) / alpha_tilde and never write a combined row. Nothing
sorts the vocabulary: the C++ kernel (csrc/sampling.cpp) selects thresholds by weighted
quickselect; the Triton kernel below bisects them in log space over passes of the row (L2-hot),
then draws by inverse CDF with the row's uniform. The uniforms are an input, drawn from the
caller's generator, so the ops are pure and CUDA-graph safe (no host sync).
"""
import numbers

import torch
import triton
import triton.language as tl

from . import _C  # noqa: F401  (loads the op schemas and CPU kernels)
from ._backend import resolve_backend, through_dispatcher
from ._registration import online_lse_update, register_cuda
from ._checks import check_alphas, check_float_tensor, check_same_device, check_scalar, value_checks_enabled
from .fused_linear import _kernel_options, _logits_tiles, check_hidden_and_head, plan_tiles, tile_budget
from .residual_q_values import check_logits_pair
from . import reference

_BLOCK_V = 2048
_BISECT_STEPS = 40  # log-space bisection: thresholds within range * 2^-40 of exact


@triton.jit
def _combined_row_tile(q_ptr, l_ptr, offs, in_v, alpha_tilde, alpha_0, HAS_BASE: tl.constexpr):
    q = tl.load(q_ptr + offs, mask=in_v, other=0.0).to(tl.float32)
    if HAS_BASE:
        l = tl.load(l_ptr + offs, mask=in_v, other=0.0).to(tl.float32)
        q = (q + alpha_0 * l) / alpha_tilde
    else:
        q = q / alpha_tilde
    return tl.where(in_v, q, -float("inf"))


@triton.jit
def _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                HAS_BASE: tl.constexpr, BLOCK_V: tl.constexpr):
    """(count, mass) of the entries whose scaled log-weight s = (y - max) / T is >= threshold."""
    count = tl.zeros([BLOCK_V], dtype=tl.float32)
    mass = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        s = (_combined_row_tile(q_ptr, l_ptr, offs, offs < V, alpha_tilde, alpha_0, HAS_BASE) - y_max) * inv_t
        keep = s >= threshold
        count += keep.to(tl.float32)
        mass += tl.where(keep, tl.exp(s), 0.0)
    return tl.sum(count, 0), tl.sum(mass, 0)


@triton.jit
def _bisect_threshold(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, lowest, target,
                      BY_COUNT: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_V: tl.constexpr,
                      STEPS: tl.constexpr):
    """Largest threshold keeping count (BY_COUNT) or mass >= target; `lo` stays feasible, `hi` not."""
    lo = lowest
    hi = 1.0
    for _ in range(STEPS):
        mid = 0.5 * (lo + hi)
        count, mass = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, mid, HAS_BASE, BLOCK_V)
        feasible = (count if BY_COUNT else mass) >= target
        lo = tl.where(feasible, mid, lo)
        hi = tl.where(feasible, hi, mid)
    return lo


@triton.jit
def _combined_sample_kernel(
    q_ptr, l_ptr, uniforms_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tokens_ptr,
    V, q_stride, l_stride, alpha_tilde, alpha_0,
    HAS_BASE: tl.constexpr, BLOCK_V: tl.constexpr, BISECT_STEPS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    q_ptr += row * q_stride
    l_ptr += row * l_stride
    # Pass 1: maximum, its first index (greedy ties go to the lowest index), minimum, NaN.
    y_max = -float("inf")
    y_min = float("inf")
    argmax = 0
    n_nan = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        y = _combined_row_tile(q_ptr, l_ptr, offs, in_v, alpha_tilde, alpha_0, HAS_BASE)
        n_nan += tl.sum((y != y).to(tl.int32), 0)
        tile_max = tl.max(y, 0)
        tile_arg = tl.min(tl.where(y == tile_max, offs, V), 0)
        argmax = tl.where(tile_max > y_max, tile_arg, argmax)
        y_max = tl.maximum(y_max, tile_max)
        y_min = tl.minimum(y_min, tl.min(tl.where(in_v & (y > -float("inf")), y, float("inf")), 0))
    bad = (n_nan > 0) | (y_max == float("inf")) | (y_max == -float("inf"))
    temperature = tl.load(temperature_ptr + row)
    token = tl.where(bad, -1, argmax).to(tl.int64)
    if (n_nan == 0) & (y_max < float("inf")) & (y_max > -float("inf")) & (temperature > 0):
        inv_t = 1.0 / temperature
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        lowest = (y_min - y_max) * inv_t
        # Keep s >= threshold; each bisection keeps `lo` feasible and `hi` infeasible.
        threshold = lowest
        if (top_k > 0) & (top_k < V):
            threshold = _bisect_threshold(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, lowest,
                                          top_k.to(tl.float32), True, HAS_BASE, BLOCK_V, BISECT_STEPS)
        if top_p < 1.0:
            _c, kept_mass = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                        HAS_BASE, BLOCK_V)
            threshold = _bisect_threshold(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                          top_p * kept_mass, False, HAS_BASE, BLOCK_V, BISECT_STEPS)
        threshold = tl.where(min_p > 0, tl.maximum(threshold, tl.log(min_p)), threshold)
        _c3, total = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                 HAS_BASE, BLOCK_V)
        target = tl.load(uniforms_ptr + row) * total
        # Inverse CDF in vocabulary order; the max entry is the fallback if rounding runs past the end.
        cumulative = 0.0
        drawn = argmax
        found = 0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            s = (_combined_row_tile(q_ptr, l_ptr, offs, offs < V, alpha_tilde, alpha_0, HAS_BASE) - y_max) * inv_t
            w = tl.where(s >= threshold, tl.exp(s), 0.0)
            running = cumulative + tl.cumsum(w, 0)
            hit = tl.min(tl.where((running > target) & (w > 0), offs, V), 0)
            take = (found == 0) & (hit < V)
            drawn = tl.where(take, hit, drawn)
            found = found | take.to(tl.int32)
            cumulative += tl.sum(w, 0)
        token = drawn.to(tl.int64)
    tl.store(tokens_ptr + row, token)


@triton.jit
def _combined_logits_kernel(q_ptr, l_ptr, out_ptr, V, q_stride, l_stride, alpha_tilde, alpha_0,
                            BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = -float("inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        l = tl.load(l_ptr + row * l_stride + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
        m, s = online_lse_update(m, s, l, 0)
    lse_l = m + tl.log(s)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        in_v = offs < V
        q = tl.load(q_ptr + row * q_stride + offs, mask=in_v, other=0.0).to(tl.float32)
        l = tl.load(l_ptr + row * l_stride + offs, mask=in_v, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * V + offs, (q + alpha_0 * (l - lse_l)) / alpha_tilde, mask=in_v)


@triton.jit
def _combined_from_hidden_kernel(ha_ptr, hb_ptr, w_ptr, b_ptr, out_ptr, N, H, V, alpha_tilde, alpha_0,
                                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = (Q + alpha_0 * L) / alpha_tilde straight from hidden states; Q and L are never stored."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    q, l = _logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                         HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], (q + alpha_0 * l) / alpha_tilde,
             mask=row_ok[:, None] & col_ok[None, :])


def _row_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_sample(q, l, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0, has_base=True):
    rows, vocab = q.shape
    tokens = torch.empty(rows, dtype=torch.long, device=q.device)
    if rows:
        _combined_sample_kernel[(rows,)](
            q, l, uniforms, temperature, top_k, top_p, min_p, tokens, vocab, q.stride(0), l.stride(0),
            alpha_tilde, alpha_0, HAS_BASE=has_base, BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)),
            BISECT_STEPS=_BISECT_STEPS, num_warps=8,
        )
    return tokens


def _triton_combined_logits(q_logits, base_logits, alpha_tilde, alpha_0):
    q, l = _row_contiguous(q_logits), _row_contiguous(base_logits)
    rows, vocab = q.shape
    out = torch.empty((rows, vocab), dtype=torch.float32, device=q.device)
    if rows:
        _combined_logits_kernel[(rows,)](q, l, out, vocab, q.stride(0), l.stride(0), alpha_tilde, alpha_0,
                                         BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return out


def _triton_combined_sample(q_logits, base_logits, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0):
    return _launch_sample(_row_contiguous(q_logits), _row_contiguous(base_logits), uniforms, temperature, top_k,
                          top_p, min_p, alpha_tilde, alpha_0)


def _triton_combined_sample_from_hidden(ha, hb, w, bias, uniforms, temperature, top_k, top_p, min_p,
                                        alpha_tilde, alpha_0, tile_vocab):
    ha, hb, w = ha.contiguous(), hb.contiguous(), w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    rows, hidden = ha.shape
    vocab = w.shape[0]
    combined = torch.empty((rows, vocab), dtype=torch.float32, device=ha.device)
    if rows:
        opts = _kernel_options(ha, bias)
        grid = (triton.cdiv(rows, opts["BLOCK_M"]), triton.cdiv(vocab, opts["BLOCK_N"]))
        _combined_from_hidden_kernel[grid](ha, hb, w, bias if bias is not None else w, combined, rows, hidden, vocab,
                                           alpha_tilde, alpha_0, **opts)
    return _launch_sample(combined, combined, uniforms, temperature, top_k, top_p, min_p, 1.0, 0.0, has_base=False)


register_cuda("combined_logits", _triton_combined_logits)
register_cuda("combined_sample", _triton_combined_sample)
register_cuda("combined_sample_from_hidden", _triton_combined_sample_from_hidden)


@torch.library.register_fake("qadapter::combined_logits")
def _combined_logits_fake(q_logits, base_logits, alpha_tilde, alpha_0):
    return q_logits.new_empty(q_logits.shape, dtype=torch.float32)


def _combined_logits_setup_context(ctx, inputs, output):
    ctx.alpha_tilde, ctx.q_dtype = inputs[2], inputs[0].dtype


def _combined_logits_backward(ctx, grad):
    # d combined / dQ = 1 / alpha_tilde; the base model is frozen, so base_logits gets none.
    return (grad / ctx.alpha_tilde).to(ctx.q_dtype), None, None, None


torch.library.register_autograd("qadapter::combined_logits", _combined_logits_backward,
                                setup_context=_combined_logits_setup_context)


@torch.library.register_fake("qadapter::combined_sample")
def _combined_sample_fake(q_logits, base_logits, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0):
    return q_logits.new_empty(q_logits.shape[0], dtype=torch.long)


@torch.library.register_fake("qadapter::combined_sample_from_hidden")
def _combined_sample_from_hidden_fake(ha, hb, w, bias, uniforms, temperature, top_k, top_p, min_p, alpha_tilde,
                                      alpha_0, tile_vocab):
    return ha.new_empty(ha.shape[0], dtype=torch.long)


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
    if through_dispatcher(backend, q_logits.device):
        return torch.ops.qadapter.combined_logits(q_logits, base_logits, alpha_tilde, alpha_0)
    return _triton_combined_logits(q_logits, base_logits, alpha_tilde, alpha_0)


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
    if through_dispatcher(backend, q_logits.device):
        tokens = torch.ops.qadapter.combined_sample(q_logits, base_logits, *params, alpha_tilde, alpha_0)
    else:
        tokens = _triton_combined_sample(q_logits, base_logits, *params, alpha_tilde, alpha_0)
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
    args = (adapter_hidden, base_hidden, lm_head_weight, lm_head_bias, *params, alpha_tilde, alpha_0, tile_vocab)
    if through_dispatcher(backend, device):
        tokens = torch.ops.qadapter.combined_sample_from_hidden(*args)
    else:
        tokens = _triton_combined_sample_from_hidden(*args)
    _check_sampling(flags, tokens, "adapter_hidden, base_hidden or lm_head_weight")
    return tokens
