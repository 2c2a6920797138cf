"""Triton building blocks and tile planning shared by the op files.

Online logsumexp, the fused LM-head logits tiles (one W tile serves the adapter and the base
stream), the launch options they need, and the tile sizes a scratch budget allows.
"""
import torch
import triton
import triton.language as tl

from .backend import TRITON_INTERPRETED

# Tile shape of the LM-head matmuls: BLOCK_M rows x BLOCK_N vocabulary columns, BLOCK_K hidden at a time.
LOGITS_BLOCK_M, LOGITS_BLOCK_N, LOGITS_BLOCK_K = 64, 64, 32


@triton.jit
def online_lse_update(running_max, running_sum, x, axis: tl.constexpr):
    """Folds a tile x into a running logsumexp along axis; -inf-only prefixes stay NaN-free."""
    new_max = tl.maximum(running_max, tl.max(x, axis))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    if axis == 0:
        tile_sum = tl.sum(tl.exp(x - shift), 0)
    else:
        tile_sum = tl.sum(tl.exp(x - shift[:, None]), 1)
    return new_max, running_sum * tl.exp(running_max - shift) + tile_sum


@triton.jit
def logits_tiles(ha_ptr, hb_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tiles of Q and L in ACC (fp32, fp64 for fp64 inputs); each W tile is loaded once for both."""
    acc_q = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_l = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h_mask = row_ok[:, None] & k_ok[None, :]
        ha = tl.load(ha_ptr + rows[:, None] * H + ks[None, :], mask=h_mask, other=0.0)
        hb = tl.load(hb_ptr + rows[:, None] * H + ks[None, :], mask=h_mask, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly; on a GPU bf16 operands feed the tensor cores
            ha = ha.to(ACC)
            hb = hb.to(ACC)
            w = w.to(ACC)
        wt = tl.trans(w)
        acc_q = tl.dot(ha, wt, acc_q, input_precision=DOT_PRECISION, out_dtype=ACC)
        acc_l = tl.dot(hb, wt, acc_l, input_precision=DOT_PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        acc_q += b[None, :]
        acc_l += b[None, :]
    return acc_q, acc_l


@triton.jit
def combined_logits_tile(hc_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, HAS_BIAS: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile of W h_c + b' (one stream): h_c and b' come in the accumulation
    dtype (fp32, fp64 for fp64 inputs) and W is converted to it, so the combined state is never rounded."""
    acc_type = hc_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_type)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(hc_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w.to(acc_type)), acc, input_precision=DOT_PRECISION, out_dtype=acc_type)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
    return acc


def combined_hidden(adapter_hidden: torch.Tensor, base_hidden: torch.Tensor, bias: torch.Tensor | None,
                    alpha_tilde: float, alpha_0: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h_c, b') of the logit identity (docs/DESIGN.md §1 (the logit identity)), contiguous, in the accumulation dtype:
    h_c = (h_q + alpha_0 h_b) / alpha_tilde, b' = b (1 + alpha_0) / alpha_tilde."""
    acc = torch.float64 if adapter_hidden.dtype == torch.float64 else torch.float32
    hc = ((adapter_hidden.to(acc) + alpha_0 * base_hidden.to(acc)) / alpha_tilde).contiguous()
    return hc, None if bias is None else (bias.to(acc) * ((1 + alpha_0) / alpha_tilde)).contiguous()


def combined_tile_options(hc: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """The constexprs of a kernel that calls ``combined_logits_tile`` on h_c."""
    exact = hc.dtype == torch.float64 or not torch.backends.cuda.matmul.allow_tf32
    return dict(HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if exact else "tf32",
                BLOCK_M=LOGITS_BLOCK_M, BLOCK_N=LOGITS_BLOCK_N, BLOCK_K=LOGITS_BLOCK_K)


def combined_tile_compile_options(acc_dtype: str, has_bias: bool) -> dict:
    """``combined_tile_options`` as a GPU build sees them (for the sm_90 compile check)."""
    return dict(HAS_BIAS=has_bias, DOT_PRECISION="ieee" if acc_dtype == "fp64" else "tf32",
                BLOCK_M=LOGITS_BLOCK_M, BLOCK_N=LOGITS_BLOCK_N, BLOCK_K=LOGITS_BLOCK_K)


def acc_constexpr(dtype: torch.dtype):
    """The Triton dtype a kernel accumulates in for inputs of ``dtype`` (ops.backend.acc_dtype's twin)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def logits_tile_options(ha: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """The constexprs of a kernel that calls ``logits_tiles`` on these hidden states."""
    fp32_exact = ha.dtype in (torch.float32, torch.float64) and not torch.backends.cuda.matmul.allow_tf32
    return dict(
        HAS_BIAS=bias is not None,
        UPCAST=TRITON_INTERPRETED or ha.dtype == torch.float64,
        DOT_PRECISION="ieee" if fp32_exact else "tf32",
        ACC=acc_constexpr(ha.dtype),
        BLOCK_M=LOGITS_BLOCK_M, BLOCK_N=LOGITS_BLOCK_N, BLOCK_K=LOGITS_BLOCK_K,
    )


def logits_tile_compile_options(triton_dtype: str, has_bias: bool) -> dict:
    """``logits_tile_options`` as a GPU build of that dtype sees them (for the sm_90 compile check)."""
    return dict(HAS_BIAS=has_bias, UPCAST=triton_dtype == "fp64",
                DOT_PRECISION="ieee" if triton_dtype in ("fp32", "fp64") else "tf32",
                ACC=tl.float64 if triton_dtype == "fp64" else tl.float32, BLOCK_M=LOGITS_BLOCK_M, BLOCK_N=LOGITS_BLOCK_N, BLOCK_K=LOGITS_BLOCK_K)


def row_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (rows may keep any stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def plan_tiles(n: int, hidden: int, vocab: int, dtype: torch.dtype, streamed_on_cpu: bool,
               budget_mb: float) -> tuple[int, int]:
    """(tile_rows, tile_vocab) whose scratch buffers fit in budget_mb.

    C++ on CPU: two fp32 [rows x vocab] logits tiles (+ an fp32 copy of the W tile for
    bf16/fp16 weights), rows up to 2048. Triton: one [rows x V] dQ block in W's dtype.
    """
    budget = budget_mb * 2**20
    elem = torch.empty(0, dtype=dtype).element_size()
    if streamed_on_cpu:
        rows = max(1, min(n, 2048))
        acc_bytes = 8 if dtype == torch.float64 else 4
        per_col = 2 * rows * acc_bytes + (hidden * acc_bytes if elem != acc_bytes else 0)
        cols = int(budget // per_col)
        return rows, max(min(vocab, 64), min(vocab, cols - cols % 64 if cols >= 64 else cols))
    return max(1, min(n, int(budget // (vocab * elem)))), vocab
