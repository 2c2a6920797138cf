"""Decoding from the customised policy: combine, filter and sample in one fused pass per row.

    combined = (Q + alpha_0 * log_softmax(L)) / alpha_tilde
    temperature -> top_k -> top_p -> min_p -> sample      (Hugging Face's order; T = 0 is greedy)

log_softmax(L) shifts a row by a constant, which neither the filters nor the draw can see, so
the kernels work on y = (Q + alpha_0 * L) / alpha_tilde and never write a combined row. Nothing
sorts the vocabulary. Both kernels bound the top-k and top-p thresholds from below by the maxima
of blocks of entries (256 on CPU, 64 here; the k-th largest block maximum is at most the k-th largest entry; the mass of
the block maxima above t is at most the row's), so only the blocks that reach the bound are read
again. The C++ kernel (csrc/sampling.cpp) selects the thresholds exactly by weighted quickselect over
those blocks' entries; the Triton kernel below gathers them into one register tile (at most
``CANDIDATE_TILE`` entries), bisects the thresholds there in log space, and draws by inverse CDF over the
tile in vocabulary order. A row whose candidates do not fit the tile (a nearly flat row) is bisected
over passes of the whole row (L2-hot) instead; both give the same thresholds, as every bisection step
below the bound is feasible either way. The uniforms are an input, drawn from the caller's
generator, so the ops are pure and CUDA-graph safe (no host sync).

Reads top-down: Triton kernels -> launchers -> CUDA registration, fake kernels, autograd ->
the unchecked entry points.
"""
import torch
import triton
import triton.language as tl

from .registration import FLOAT_TYPES, KernelVariant, pointers, register_cuda, register_triton_kernel, scalars
from .triton_helpers import (
    combined_hidden,
    combined_logits_tile,
    combined_tile_compile_options,
    combined_tile_options,
    logits_tile_compile_options,
    logits_tile_options,
    logits_tiles,
    online_lse_update,
    row_contiguous,
)

_BLOCK_V = 2048
_BISECT_STEPS = 40  # log-space bisection: thresholds within range * 2^-40 of exact
_SUB_BLOCK = 64  # entries per block maximum
CANDIDATE_TILE = 4096  # the candidate tile: the entries of up to 64 blocks that reach the bound
# The bisection's lower end, as a scaled log-weight s = (y - max) / T: exp(s) is exactly 0 in fp32
# below about -104, so entries there can never be drawn and where a threshold falls among them
# changes no draw. Without this floor a finite mask such as finfo(float32).min would stretch the
# range to ~3e38 and leave the thresholds meaningless after the bisection's steps.
_LOWEST_LOG_WEIGHT = tl.constexpr(-128.0)


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
def _bisect_tile(s, lowest, target, BY_COUNT: tl.constexpr, STEPS: tl.constexpr):
    """``_bisect_threshold`` over a tile of scaled log-weights held in registers (no pass over memory)."""
    lo = lowest
    hi = 1.0
    for _ in range(STEPS):
        mid = 0.5 * (lo + hi)
        keep = s >= mid
        if BY_COUNT:
            kept = tl.sum(keep.to(tl.float32), 0)
        else:
            kept = tl.sum(tl.where(keep, tl.exp(s), 0.0), 0)
        feasible = kept >= target
        lo = tl.where(feasible, mid, lo)
        hi = tl.where(feasible, hi, mid)
    return lo


@triton.jit
def _combined_sample_kernel(
    q_ptr, l_ptr, uniforms_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, tokens_ptr,
    block_max_ptr, candidates_ptr, V, NB, q_stride, l_stride, alpha_tilde, alpha_0,
    HAS_BASE: tl.constexpr, BLOCK_V: tl.constexpr, BISECT_STEPS: tl.constexpr,
    SUB: tl.constexpr, NB_PAD: tl.constexpr, CANDIDATES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    q_ptr += row * q_stride
    l_ptr += row * l_stride
    block_max_ptr += row * NB
    candidates_ptr += row * NB
    # Pass 1: maximum, its first index (greedy ties go to the lowest index), minimum, NaN, and the
    # maximum of every SUB-entry block (scratch [NB]).
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
        blocks = start // SUB + tl.arange(0, BLOCK_V // SUB)
        tl.store(block_max_ptr + blocks, tl.max(tl.reshape(y, [BLOCK_V // SUB, SUB]), 1), mask=blocks < NB)
    bad = (n_nan > 0) | (y_max == float("inf")) | (y_max == -float("inf"))
    temperature = tl.load(temperature_ptr + row)
    token = tl.where(bad, -1, argmax).to(tl.int64)
    if (n_nan == 0) & (y_max < float("inf")) & (y_max > -float("inf")) & (temperature > 0):
        inv_t = 1.0 / temperature
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        uniform = tl.load(uniforms_ptr + row)
        by_k = (top_k > 0) & (top_k < V)
        by_p = top_p < 1.0
        lowest = tl.maximum((y_min - y_max) * inv_t, _LOWEST_LOG_WEIGHT)
        tl.debug_barrier()  # the block maxima stored by every thread above are read by others below
        # The bound: top-k's from the k-th largest block maximum; else top-p's from the block maxima's
        # mass over the row's; else min-p's own threshold.
        b = tl.arange(0, NB_PAD)
        s_blocks = tl.where(b < NB, (tl.load(block_max_ptr + b, mask=b < NB, other=0.0) - y_max) * inv_t,
                            -float("inf"))
        total = 1.0
        bound = tl.log(tl.maximum(min_p, 1e-30))
        if by_k:
            bound = _bisect_tile(s_blocks, lowest, top_k.to(tl.float32), True, BISECT_STEPS)
        else:
            if by_p:
                _c, total = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, lowest,
                                        HAS_BASE, BLOCK_V)
                bound = _bisect_tile(s_blocks, lowest, top_p * total, False, BISECT_STEPS)
        reaching = (s_blocks >= bound).to(tl.int32)
        n_candidates = tl.sum(reaching, 0)
        tl.store(candidates_ptr + tl.cumsum(reaching, 0) - 1, b, mask=reaching > 0)
        tl.debug_barrier()
        done = 0
        if (by_k | by_p | (min_p > 0)) & (n_candidates * SUB <= CANDIDATES):
            # The candidate blocks' entries, in vocabulary order, as scaled log-weights s = (y - max) / T.
            c = tl.arange(0, CANDIDATES)
            slot = c // SUB
            offs = tl.load(candidates_ptr + slot, mask=slot < n_candidates, other=0) * SUB + c % SUB
            ok = (slot < n_candidates) & (offs < V)
            s = (_combined_row_tile(q_ptr, l_ptr, offs, ok, alpha_tilde, alpha_0, HAS_BASE) - y_max) * inv_t
            threshold = lowest
            if by_k:
                threshold = _bisect_tile(s, lowest, top_k.to(tl.float32), True, BISECT_STEPS)
            if by_p:
                if by_k:  # top-p renormalises over what top-k kept
                    total = tl.sum(tl.where(s >= threshold, tl.exp(s), 0.0), 0)
                target = top_p * total
                # Rounding can leave the candidates' mass just short of what the block maxima promised:
                # then the whole row is bisected below.
                reached = tl.sum(tl.where(s >= bound, tl.exp(s), 0.0), 0) >= target
                threshold = _bisect_tile(s, threshold, target, False, BISECT_STEPS)
            else:
                reached = n_candidates >= 0  # nothing promised: always
            threshold = tl.where(min_p > 0, tl.maximum(threshold, tl.log(min_p)), threshold)
            w = tl.where(s >= threshold, tl.exp(s), 0.0)
            running = tl.cumsum(w, 0)
            hit = tl.min(tl.where((running > uniform * tl.sum(w, 0)) & (w > 0), offs, V), 0)
            last = tl.max(tl.where(w > 0, offs, -1), 0)  # rounding ran past the end: the last kept entry
            if reached:
                token = tl.where(hit < V, hit, last).to(tl.int64)
                done = 1
        if done == 0:
            # Keep s >= threshold; each bisection keeps `lo` feasible and `hi` infeasible.
            threshold = lowest
            if by_k:
                threshold = _bisect_threshold(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, lowest,
                                              top_k.to(tl.float32), True, HAS_BASE, BLOCK_V, BISECT_STEPS)
            if by_p:
                kept_mass = total  # top-p alone: the row's mass, from the pass that set the bound
                if by_k:
                    _c, kept_mass = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                                HAS_BASE, BLOCK_V)
                threshold = _bisect_threshold(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                              top_p * kept_mass, False, HAS_BASE, BLOCK_V, BISECT_STEPS)
            threshold = tl.where(min_p > 0, tl.maximum(threshold, tl.log(min_p)), threshold)
            _c3, kept = _kept_stats(q_ptr, l_ptr, V, alpha_tilde, alpha_0, y_max, inv_t, threshold,
                                    HAS_BASE, BLOCK_V)
            target = uniform * kept
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
                                 ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    """y = (Q + alpha_0 * L) / alpha_tilde straight from hidden states; Q and L are never stored."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    q, l = logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                        HAS_BIAS, UPCAST, DOT_PRECISION, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], (q + alpha_0 * l) / alpha_tilde,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combined_hidden_logits_kernel(hc_ptr, w_ptr, b_ptr, out_ptr, N, H, V, HAS_BIAS: tl.constexpr,
                                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """y = W h_c + b' (docs/DESIGN.md §1 (the logit identity)): one head product instead of two."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    y = combined_logits_tile(hc_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, HAS_BIAS, DOT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], y.to(tl.float32), mask=row_ok[:, None] & col_ok[None, :])


def _sample_tiles(vocab: int) -> dict:
    """The row tile, block and block-count constexprs of ``_combined_sample_kernel`` for ``vocab`` entries."""
    block_v = min(_BLOCK_V, triton.next_power_of_2(vocab))
    sub = min(_SUB_BLOCK, block_v)
    return {"BLOCK_V": block_v, "SUB": sub, "NB_PAD": triton.next_power_of_2(triton.cdiv(vocab, sub)),
            "CANDIDATES": CANDIDATE_TILE}


def _launch_sample(q, l, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0, has_base=True):
    rows, vocab = q.shape
    tokens = torch.empty(rows, dtype=torch.long, device=q.device)
    if rows:
        tiles = _sample_tiles(vocab)
        blocks = triton.cdiv(vocab, tiles["SUB"])
        block_max = torch.empty((rows, blocks), dtype=torch.float32, device=q.device)
        candidates = torch.empty((rows, blocks), dtype=torch.int32, device=q.device)
        _combined_sample_kernel[(rows,)](
            q, l, uniforms, temperature, top_k, top_p, min_p, tokens, block_max, candidates, vocab, blocks,
            q.stride(0), l.stride(0), alpha_tilde, alpha_0, HAS_BASE=has_base, BISECT_STEPS=_BISECT_STEPS,
            num_warps=8, **tiles,
        )
    return tokens


def _triton_combined_logits(q_logits, base_logits, alpha_tilde, alpha_0):
    q, l = row_contiguous(q_logits), row_contiguous(base_logits)
    rows, vocab = q.shape
    out = torch.empty((rows, vocab), dtype=torch.float32, device=q.device)
    if rows:
        _combined_logits_kernel[(rows,)](q, l, out, vocab, q.stride(0), l.stride(0), alpha_tilde, alpha_0,
                                         BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8)
    return out


def _triton_combined_sample(q_logits, base_logits, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0):
    return _launch_sample(row_contiguous(q_logits), row_contiguous(base_logits), uniforms, temperature, top_k,
                          top_p, min_p, alpha_tilde, alpha_0)


def _triton_combined_sample_from_hidden(ha, hb, w, bias, uniforms, temperature, top_k, top_p, min_p,
                                        alpha_tilde, alpha_0, tile_vocab, two_stream=False):
    w = w.contiguous()
    rows, hidden = ha.shape
    vocab = w.shape[0]
    combined = torch.empty((rows, vocab), dtype=torch.float32, device=ha.device)
    if rows and two_stream:
        ha, hb = ha.contiguous(), hb.contiguous()
        bias = bias.contiguous() if bias is not None else None
        opts = logits_tile_options(ha, bias)
        grid = (triton.cdiv(rows, opts["BLOCK_M"]), triton.cdiv(vocab, opts["BLOCK_N"]))
        _combined_from_hidden_kernel[grid](ha, hb, w, bias if bias is not None else w, combined, rows, hidden, vocab,
                                           alpha_tilde, alpha_0, **opts)
    elif rows:
        hc, bc = combined_hidden(ha, hb, bias, alpha_tilde, alpha_0)
        opts = combined_tile_options(hc, bc)
        grid = (triton.cdiv(rows, opts["BLOCK_M"]), triton.cdiv(vocab, opts["BLOCK_N"]))
        _combined_hidden_logits_kernel[grid](hc, w, bc if bc is not None else hc, combined, rows, hidden, vocab,
                                             **opts)
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
                                      alpha_0, tile_vocab, two_stream=False):
    return ha.new_empty(ha.shape[0], dtype=torch.long)


def combined_logits_rows(q_logits, base_logits, alpha_tilde: float, alpha_0: float,
                         via_dispatcher: bool) -> torch.Tensor:
    """fp32 [B, V] combined logits of [B, V] logits; no argument checks."""
    if via_dispatcher:
        return torch.ops.qadapter.combined_logits(q_logits, base_logits, alpha_tilde, alpha_0)
    return _triton_combined_logits(q_logits, base_logits, alpha_tilde, alpha_0)


def sample_rows(q_logits, base_logits, uniforms, temperature, top_k, top_p, min_p, alpha_tilde: float,
                alpha_0: float, via_dispatcher: bool) -> torch.Tensor:
    """One token per row (-1 for a row without a finite maximum); per-row [B] parameters; no checks."""
    args = (q_logits, base_logits, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0)
    if via_dispatcher:
        return torch.ops.qadapter.combined_sample(*args)
    return _triton_combined_sample(*args)


def sample_from_hidden_rows(adapter_hidden, base_hidden, weight, bias, uniforms, temperature, top_k, top_p, min_p,
                            alpha_tilde: float, alpha_0: float, tile_vocab: int, via_dispatcher: bool,
                            two_stream: bool = False) -> torch.Tensor:
    """``sample_rows`` from [B, H] hidden states and the LM head (one product on h_c, or two streams); no checks."""
    args = (adapter_hidden, base_hidden, weight, bias, uniforms, temperature, top_k, top_p, min_p, alpha_tilde,
            alpha_0, tile_vocab, two_stream)
    if via_dispatcher:
        return torch.ops.qadapter.combined_sample_from_hidden(*args)
    return _triton_combined_sample_from_hidden(*args)


def _register_compile_variants() -> None:
    from_hidden, sample, logits = [], [], []
    hidden_logits = [KernelVariant({**pointers(["hc_ptr"], acc), "w_ptr": f"*{dt}", "b_ptr": f"*{acc}",
                                    "out_ptr": "*fp32", **scalars("i32", "N", "H", "V")},
                                   combined_tile_compile_options(acc, has_bias))
                     for dt in FLOAT_TYPES for acc in ["fp64" if dt == "fp64" else "fp32"]
                     for has_bias in (False, True)]
    for dt in FLOAT_TYPES:
        for has_bias in (False, True):
            opts = logits_tile_compile_options(dt, has_bias)
            from_hidden.append(KernelVariant({**pointers(["ha_ptr", "hb_ptr", "w_ptr", "b_ptr"], dt), "out_ptr": "*fp32",
                                              **scalars("i32", "N", "H", "V"), **scalars("fp32", "alpha_tilde", "alpha_0")},
                                             opts))
        rows = {**pointers(["q_ptr", "l_ptr"], dt), **scalars("i32", "V", "q_stride", "l_stride"),
                **scalars("fp32", "alpha_tilde", "alpha_0")}
        for has_base in (True, False):
            sample.append(KernelVariant(
                {**rows, **pointers(["uniforms_ptr", "temperature_ptr", "top_p_ptr", "min_p_ptr", "block_max_ptr"],
                                    "fp32"), "top_k_ptr": "*i64", "tokens_ptr": "*i64", "candidates_ptr": "*i32",
                 "NB": "i32"},
                {"HAS_BASE": has_base, "BISECT_STEPS": _BISECT_STEPS, **_sample_tiles(128256)}))
        logits.append(KernelVariant({**rows, "out_ptr": "*fp32"}, {"BLOCK_V": _BLOCK_V}))
    register_triton_kernel(_combined_from_hidden_kernel, from_hidden)
    register_triton_kernel(_combined_hidden_logits_kernel, hidden_logits)
    register_triton_kernel(_combined_sample_kernel, sample)
    register_triton_kernel(_combined_logits_kernel, logits)


_register_compile_variants()
