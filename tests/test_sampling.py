"""Decoding from the customised policy: combined_logits, combined_sample, combined_sample_from_hidden.

Two kinds of evidence (docs/DESIGN.md §2 "Decoding", in the style of FlashInfer's sampling tests):

* statistical: 200k draws of one row replicated as a batch; the empirical distribution must match
  the distribution that Hugging Face's own warpers (temperature -> top_k -> top_p -> min_p) give,
  with not a single draw outside their support;
* exact: the raw op is a pure function of its uniforms (inverse CDF in vocabulary order over the
  filtered distribution), so with fixed uniforms every kernel must return exactly the token of an
  fp64 oracle built on ``reference.filtered_logits`` (itself checked against Hugging Face). Rows
  whose answer hangs on rounding (a filter boundary or a uniform within 1e-5 of a tie) are left
  out, and must be rare.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import qadapter_kernels as qk
from qadapter_kernels import reference
from qadapter_kernels.ops import sampling as qk_sampling

from helpers import (
    ALL_BACKENDS,
    FUSED,
    assert_close,
    call_with_backend,
    generator,
    interpreted,
    make_rows,
    no_interpreter_with_cuda,
)

NEG_INF = float("-inf")
OP = torch.ops.qadapter

# --------------------------------------------------------------------------- oracles


def hf_filtered(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Hugging Face's warpers in generate's order, each only when active (as generate builds them)."""
    z = logits
    ids = torch.zeros(z.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        z = TemperatureLogitsWarper(float(temperature))(ids, z)
    if top_k:
        z = TopKLogitsWarper(int(top_k))(ids, z)
    if top_p < 1.0:
        z = TopPLogitsWarper(float(top_p))(ids, z)
    if min_p > 0.0:
        z = MinPLogitsWarper(float(min_p))(ids, z)
    return z


def as_rows(value, rows: int, dtype) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).expand(rows).clone()


def oracle_tokens(q, base, uniforms, temperature, top_k, top_p, min_p, alpha_tilde, alpha_0):
    """fp64 inverse CDF over reference.filtered_logits; greedy rows take the first argmax.

    Returns (tokens, ambiguous): ``ambiguous`` marks rows where fp32 rounding may legitimately
    decide (a top-k gap, a top-p cumulative, a min-p ratio or a CDF step within 1e-5 of the cut)."""
    rows, vocab = q.shape
    t = as_rows(temperature, rows, torch.float64)
    k = as_rows(top_k, rows, torch.long)
    p = as_rows(top_p, rows, torch.float64)
    mp = as_rows(min_p, rows, torch.float64)
    u = as_rows(uniforms, rows, torch.float64)
    y = reference.combined_logits(q.double(), base.double(), alpha_tilde=alpha_tilde, alpha_0=alpha_0)
    assert y.dtype == torch.float64
    z = reference.filtered_logits(y, temperature=t, top_k=k, top_p=p, min_p=mp)
    probs = z.softmax(-1)
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    drawn = (cdf <= u[:, None] * total).sum(-1).clamp(max=vocab - 1)
    greedy = t == 0
    tokens = torch.where(greedy, y.argmax(-1), drawn)

    ambiguous = torch.zeros(rows, dtype=torch.bool)
    tol = 1e-5
    for r in range(rows):
        ys = y[r]
        if greedy[r]:
            top2 = ys.topk(min(2, vocab)).values
            ambiguous[r] = vocab > 1 and bool(top2[0] - top2[1] < tol) and bool(top2[0] != top2[1])
            continue
        s = ys / t[r]
        kr = int(k[r])
        if 0 < kr < vocab:
            srt = s.sort(descending=True).values
            a, b = srt[kr - 1], srt[kr]
            if math.isfinite(a) and a != b and a - b < 1e-4:
                ambiguous[r] = True
        if p[r] < 1:
            z1 = reference.filtered_logits(ys[None], temperature=t[r], top_k=kr, top_p=1.0, min_p=0.0)[0]
            c = z1.softmax(-1).sort().values.cumsum(-1)[:-1]  # the top entry is always kept
            if bool(((c - (1 - p[r])).abs() < tol).any()):
                ambiguous[r] = True
            # The last entry kept and the first dropped within fp32 rounding of each other: the kernels
            # may see them tied (top-p then keeps both) where fp64 does not.
            z3 = reference.filtered_logits(ys[None], temperature=t[r], top_k=kr, top_p=p[r], min_p=0.0)[0]
            kept_p, dropped_p = z3[torch.isfinite(z3)], z1[torch.isfinite(z1) & ~torch.isfinite(z3)]
            if dropped_p.numel() and bool(kept_p.min() - dropped_p.max() < 1e-4):
                ambiguous[r] = True
        if mp[r] > 0:
            z2 = reference.filtered_logits(ys[None], temperature=t[r], top_k=kr, top_p=p[r], min_p=0.0)[0]
            pr = z2.softmax(-1)
            ratio = pr[pr > 0] / pr.max()
            if bool(((ratio - mp[r]).abs() < tol * mp[r] + 1e-7).any()):
                ambiguous[r] = True
        kept = probs[r] > 0
        steps = (cdf[r] / total[r])[kept][:-1]  # every CDF step but the last (which is 1)
        if bool(((steps - u[r]).abs() < tol).any()):
            ambiguous[r] = True
    return tokens, ambiguous


def assert_tokens_match(actual, expected, ambiguous, what, min_clear=0.8):
    assert actual.dtype == torch.long and actual.shape == expected.shape, (what, actual.dtype, actual.shape)
    clear = ~ambiguous
    assert clear.float().mean() >= min_clear, f"{what}: too many rounding-ambiguous rows ({int(ambiguous.sum())})"
    bad = (actual.cpu() != expected) & clear
    if bad.any():
        rows = bad.nonzero().flatten().tolist()[:10]
        raise AssertionError(f"{what}: {int(bad.sum())} rows differ from the oracle, e.g. rows {rows}: "
                             f"got {actual.cpu()[rows].tolist()}, expected {expected[rows].tolist()}")


def params(rows, temperature, top_k, top_p, min_p):
    """The raw op's per-row parameter tensors."""
    return (as_rows(temperature, rows, torch.float32), as_rows(top_k, rows, torch.long),
            as_rows(top_p, rows, torch.float32), as_rows(min_p, rows, torch.float32))


def run_raw(backend, q, base, uniforms, t, k, p, mp, alpha_tilde, alpha_0):
    """The fused kernel with given uniforms: the C++ op, or the Triton kernel (the interpreter on CPU)."""
    via_dispatcher = backend == "cpu" or q.device.type == "cuda"
    return qk_sampling.sample_rows(q, base, uniforms, t, k, p, mp, alpha_tilde, alpha_0, via_dispatcher)


def random_rows(rows, vocab, seed, dtype=torch.float32, neg_inf=None, scale=3.0):
    """q, base [rows, V] (fp32 N(0, scale^2)); neg_inf in (None, "q", "base", "both") bans ~20% of
    the entries (never index 0, so a row keeps a finite entry)."""
    gen = generator(seed)
    q = scale * torch.randn(rows, vocab, generator=gen)
    base = scale * torch.randn(rows, vocab, generator=gen)
    for name, t in (("q", q), ("base", base)):
        if neg_inf in (name, "both"):
            ban = torch.rand(rows, vocab, generator=gen) < 0.2
            ban[:, 0] = False
            t.masked_fill_(ban, NEG_INF)
    return q.to(dtype), base.to(dtype)


# --------------------------------------------------------------------------- 1. statistics

# (id, V, alpha_tilde, alpha_0, temperature, top_k, top_p, min_p, neg_inf)
STAT_CASES = [
    ("plain", 32, 1.0, 0.01, 1.0, 0, 1.0, 0.0, None),
    ("temperature", 48, 1.0, 0.5, 0.7, 0, 1.0, 0.0, None),
    ("top_k", 20, 0.8, 0.3, 1.0, 5, 1.0, 0.0, None),
    ("top_p", 64, 1.0, 1.0, 1.0, 0, 0.8, 0.0, None),
    ("min_p", 40, 1.5, 0.01, 1.0, 0, 1.0, 0.1, None),
    ("combined", 64, 1.0, 0.5, 1.3, 10, 0.9, 0.05, None),
    ("neg-inf-q", 40, 1.0, 0.5, 1.0, 0, 0.9, 0.0, "q"),
    ("neg-inf-base-combined", 40, 0.7, 1.0, 1.3, 10, 0.9, 0.05, "base"),
]
N_DRAWS = 200_000


# The reference sampler (sort + multinomial) is slower: two cases suffice for it.
STAT_PARAMS = [pytest.param(c, "cpu", id=f"{c[0]}-cpu") for c in STAT_CASES] + [
    pytest.param(c, "torch", id=f"{c[0]}-torch") for c in STAT_CASES if c[0] in ("plain", "neg-inf-base-combined")]


@pytest.mark.parametrize("case, backend", STAT_PARAMS)
def test_empirical_distribution_matches_hf_warpers(case, backend, seed):
    name, vocab, at, a0, temp, top_k, top_p, min_p, neg_inf = case
    q, base = random_rows(1, vocab, seed, neg_inf=neg_inf, scale=1.5)
    # Guard the oracle: no filter boundary within rounding of this row.
    _, ambiguous = oracle_tokens(q, base, torch.tensor([0.5]), temp, top_k, top_p, min_p, at, a0)
    assert not ambiguous.any(), "pick another seed: the row sits on a filter boundary"

    combined = qk.combined_logits(q, base, alpha_tilde=at, alpha_0=a0, backend="torch")
    z = hf_filtered(combined, temp, top_k, top_p, min_p)
    expected = z.double().softmax(-1)[0]
    support = expected > 0
    assert 1 < int(support.sum()) < vocab or (top_k, top_p, min_p, neg_inf) == (0, 1.0, 0.0, None)

    tokens = qk.combined_sample(q.expand(N_DRAWS, vocab), base.expand(N_DRAWS, vocab), alpha_tilde=at, alpha_0=a0, temperature=temp,
                                top_k=top_k, top_p=top_p, min_p=min_p,
                                generator=torch.Generator().manual_seed(seed), backend=backend)
    assert tokens.shape == (N_DRAWS,) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < vocab
    counts = torch.bincount(tokens, minlength=vocab).double()
    outside = int(counts[~support].sum())
    stray = (~support & (counts > 0)).nonzero().flatten().tolist()
    assert outside == 0, f"{outside} draws outside the support, at tokens {stray}"
    empirical = counts / N_DRAWS
    tv = 0.5 * (empirical - expected).abs().sum().item()
    assert tv < 0.01, f"total variation {tv:.4f}"
    # Per token, within 5 standard deviations of the binomial count.
    sigma = (expected * (1 - expected) / N_DRAWS).sqrt()
    worst = ((empirical - expected).abs() / (sigma + 1e-12))[support].max().item()
    assert worst < 5, f"a token's frequency is {worst:.1f} sigma off"


PARAM_GRID = [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=1.3, top_k=10, top_p=0.9, min_p=0.05),
    dict(temperature=0.5, top_k=3, top_p=0.5, min_p=0.2),
    dict(temperature=2.0, top_k=1, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.999),
    dict(temperature=0.3, top_k=40, top_p=0.95, min_p=0.0),
]


@pytest.mark.parametrize("neg_inf", [None, "q", "base"])
@pytest.mark.parametrize("kw", PARAM_GRID, ids=lambda kw: "T{temperature}-k{top_k}-p{top_p}-m{min_p}".format(**kw))
def test_reference_filter_equals_hf_warpers(kw, neg_inf, seed):
    """Validates the oracle: reference.filtered_logits is Hugging Face's warpers, bit for bit."""
    q, base = random_rows(24, 64, seed, neg_inf=neg_inf)
    logits = qk.combined_logits(q, base, alpha_tilde=1.0, alpha_0=0.5, backend="torch")
    ours = reference.filtered_logits(logits, **kw)
    hf = hf_filtered(logits, **kw)
    assert torch.equal(torch.isneginf(ours), torch.isneginf(hf)), "different tokens removed"
    assert torch.equal(ours, hf)
    # The same with the parameters given as per-row tensors, each row its own set.
    grid = [PARAM_GRID[i % len(PARAM_GRID)] for i in range(24)]
    per_row = {key: torch.tensor([g[key] for g in grid]) for key in kw}
    ours = reference.filtered_logits(logits, **per_row)
    for r, g in enumerate(grid):
        assert torch.equal(ours[r:r + 1], hf_filtered(logits[r:r + 1], **g)), f"row {r} with {g}"


# --------------------------------------------------------------------------- 2. exactness with fixed uniforms


def edge_uniforms(rows, seed):
    u = torch.rand(rows, generator=generator(seed + 1))
    u[0] = 0.0
    u[1] = 1.0 - 2.0 ** -24  # the largest fp32 below 1: the last kept token (unless rounding decides)
    return u


@pytest.mark.parametrize("neg_inf", [None, "q", "base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kw", PARAM_GRID, ids=lambda kw: "T{temperature}-k{top_k}-p{top_p}-m{min_p}".format(**kw))
def test_cpu_op_equals_inverse_cdf_oracle(kw, dtype, neg_inf, seed):
    rows, vocab = 64, 97
    q, base = random_rows(rows, vocab, seed, dtype=dtype, neg_inf=neg_inf)
    at, a0 = 0.9, 0.5
    u = edge_uniforms(rows, seed)
    expected, ambiguous = oracle_tokens(q, base, u, **kw, alpha_tilde=at, alpha_0=a0)
    got = run_raw("cpu", q, base, u, *params(rows, **kw), at, a0)
    assert_tokens_match(got, expected, ambiguous, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_op_random_per_row_parameters_and_strided_rows(dtype, seed):
    rows, vocab = 256, 300
    gen = generator(seed)
    q, base = random_rows(rows, 2 * vocab, seed, dtype=dtype, neg_inf="both")
    q, base = q[:, ::2], base[:, 1::2]  # strided rows: the op must read them as given
    temperature = torch.rand(rows, generator=gen) * 2
    temperature[::7] = 0.0
    top_k = torch.randint(0, vocab + 10, (rows,), generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(rows, generator=gen).clamp(min=0.05)
    top_p[::4] = 1.0
    min_p = torch.rand(rows, generator=gen) * 0.3
    min_p[::2] = 0.0
    u = torch.rand(rows, generator=gen)
    expected, ambiguous = oracle_tokens(q, base, u, temperature, top_k, top_p, min_p, 1.2, 0.3)
    got = run_raw("cpu", q, base, u, temperature, top_k, top_p, min_p, 1.2, 0.3)
    assert_tokens_match(got, expected, ambiguous, "cpu per-row")


def heavy_tailed_rows(rows, vocab, seed, ties: bool):
    """q, base like decoding's logits: base = 1.5 * Gumbel (a few tokens far above the rest, so a
    nucleus of 1 to a few hundred tokens), q = base + N(0, 0.5^2); with ``ties`` both are rounded to
    steps of 0.5, so many entries share a value (and a block maximum equals the threshold)."""
    gen = generator(seed)
    base = -1.5 * torch.log(-torch.log(torch.rand(rows, vocab, generator=gen).clamp(1e-12, 1 - 1e-7)))
    q = base + 0.5 * torch.randn(rows, vocab, generator=gen)
    if ties:
        q, base = (q * 2).round() / 2, (base * 2).round() / 2
    return q, base


# The CPU kernel bounds the top-k and top-p thresholds by the maxima of 256-entry blocks (or of their
# vector lanes) and forms again only the blocks that reach the bound: these vocabularies have 17 and 125
# blocks, with nuclei inside one block, spread over many, and larger than the number of blocks; rows
# without a filter (r = 9 mod 12) walk the blocks' masses, then one block.
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("vocab", [4099, 32000])
def test_cpu_op_equals_inverse_cdf_oracle_over_many_blocks(vocab, ties, seed):
    rows = 96
    gen = generator(seed + 7)
    q, base = heavy_tailed_rows(rows, vocab, seed, ties)
    q[:8, 64:128] += 6.0  # rows whose nucleus sits inside one block
    q[8:16] = q[8:16] * 0.05  # nearly flat rows: the block maxima cannot reach the top-p mass
    base[16:24].masked_fill_(torch.rand(8, vocab, generator=gen) < 0.5, NEG_INF)
    # Gaussian rows of std 4 (a head product's logits): nuclei of hundreds of tokens, many sharing a
    # block, where the bound comes from the maxima of each block's vector lanes.
    q[24:40] = 4 * torch.randn(16, vocab, generator=gen)
    base[24:40] = q[24:40] + 0.1 * torch.randn(16, vocab, generator=gen)
    temperature = torch.rand(rows, generator=gen) * 1.5 + 0.2
    temperature[::11] = 0.0
    top_k = torch.randint(1, 120, (rows,), generator=gen)
    top_k[::3] = 0
    top_k[5::17] = vocab // 40  # more than the number of blocks at V = 4099
    top_p = torch.rand(rows, generator=gen) * 0.95 + 0.04
    top_p[1::4] = 1.0
    min_p = torch.rand(rows, generator=gen) * 0.2
    min_p[1::2] = 0.0
    u = edge_uniforms(rows, seed)
    expected, ambiguous = oracle_tokens(q, base, u, temperature, top_k, top_p, min_p, 1.0, 0.5)
    got = run_raw("cpu", q, base, u, temperature, top_k, top_p, min_p, 1.0, 0.5)
    assert_tokens_match(got, expected, ambiguous, f"cpu V={vocab}")


# Each row of the Triton batch gets its own parameter set (the interpreter is slow: 8 rows a call).
TRITON_ROWS = [PARAM_GRID[i] for i in (0, 2, 3, 4, 5, 6, 9, 10)]


@no_interpreter_with_cuda
@pytest.mark.parametrize("neg_inf", [None, "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_equals_inverse_cdf_oracle(dtype, neg_inf, seed):
    rows, vocab = len(TRITON_ROWS), 97
    q, base = random_rows(rows, vocab, seed, dtype=dtype, neg_inf=neg_inf)
    u = edge_uniforms(rows, seed)
    per_row = {key: torch.tensor([g[key] for g in TRITON_ROWS]) for key in TRITON_ROWS[0]}
    expected, ambiguous = oracle_tokens(q, base, u, **per_row, alpha_tilde=0.9, alpha_0=0.5)
    got = run_raw("triton", q, base, u, *params(rows, **per_row), 0.9, 0.5)
    assert_tokens_match(got, expected, ambiguous, "triton", min_clear=0.75)


@no_interpreter_with_cuda
def test_triton_kernel_multi_tile_rows(seed):
    """V > the kernel's 2048-wide block: thresholds and the draw must carry across tiles."""
    rows, vocab = 3, 2048 + 300
    q, base = random_rows(rows, vocab, seed, neg_inf="q")
    u = torch.tensor([0.0, 0.5, 0.999])
    t, k, p, mp = torch.tensor([1.0, 0.8, 1.2]), torch.tensor([0, 2100, 50]), torch.tensor([0.9, 1.0, 0.95]), \
        torch.tensor([0.0, 0.01, 0.0])
    expected, ambiguous = oracle_tokens(q, base, u, t, k, p, mp, 1.0, 0.01)
    got = run_raw("triton", q, base, u, t, k, p, mp, 1.0, 0.01)
    assert_tokens_match(got, expected, ambiguous, "triton multi-tile", min_clear=1.0)


# The Triton kernel gathers the blocks that reach the bound into one register tile; a row whose
# candidates overflow the tile (a nearly flat row, a top-k past the number of blocks) is bisected over
# the whole row instead. With the tile shrunk to one block nearly every row takes the whole-row path:
# both must draw the same tokens, and those of the oracle.
@no_interpreter_with_cuda
def test_triton_candidate_tile_draws_what_the_whole_row_bisection_draws(monkeypatch, seed):
    rows, vocab = 20, 8192 + 77
    gen = generator(seed + 3)
    q, base = heavy_tailed_rows(rows, vocab, seed, ties=False)
    q[:4, 64:128] += 6.0  # nuclei inside one block
    q[4:8] = q[4:8] * 0.05  # nearly flat: the candidates overflow the tile
    q[8:14] = 4 * torch.randn(6, vocab, generator=gen)  # Gaussian: nuclei spread over many blocks
    base[8:14] = q[8:14] + 0.1 * torch.randn(6, vocab, generator=gen)
    q[14:18] = q[14:18].masked_fill(torch.rand(4, vocab, generator=gen) < 0.6, torch.finfo(torch.float32).min)
    temperature = torch.rand(rows, generator=gen) + 0.3
    top_k = torch.tensor([0, 1, 5, 40, 200])[torch.arange(rows) % 5]
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95])[torch.arange(rows) % 4]
    min_p = torch.tensor([0.0, 0.0, 0.05])[torch.arange(rows) % 3]
    u = edge_uniforms(rows, seed)
    args = (q, base, u, temperature, top_k, top_p, min_p, 1.0, 0.5)
    got = run_raw("triton", *args)
    monkeypatch.setattr(qk_sampling, "CANDIDATE_TILE", 64)
    assert torch.equal(got, run_raw("triton", *args))
    expected, ambiguous = oracle_tokens(*args)
    assert_tokens_match(got, expected, ambiguous, "triton candidate tile", min_clear=0.75)


@no_interpreter_with_cuda
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_k=4), dict(top_p=0.7), dict(top_k=6, top_p=0.8)],
                         ids=["top_k=1", "top_k=4", "top_p=0.7", "top_k=6+top_p=0.8"])
def test_triton_kernel_with_finite_min_masks(filters, seed):
    """Rows masked with finfo(float32).min, as serving code does. The bisection
    used to span ~3e38, so its threshold was meaningless and top-k/top-p were off; the Triton kernel
    must draw exactly what the C++ kernel (exact quickselect) draws from the same uniforms, and
    top_k=1 must be the argmax."""
    rows, vocab = 24, 131
    gen = generator(seed)
    q = torch.randn(rows, vocab, generator=gen) * 2
    base = torch.randn(rows, vocab, generator=gen) * 2
    banned = torch.rand(rows, vocab, generator=gen) < 0.6
    banned[:, 0] = False  # every row keeps a finite, unmasked entry
    q = q.masked_fill(banned, torch.finfo(torch.float32).min)
    u = torch.rand(rows, generator=gen)
    per_row = params(rows, 1.0, filters.get("top_k", 0), filters.get("top_p", 1.0), 0.0)
    got = run_raw("triton", q, base, u, *per_row, 1.0, 0.01)
    expected = run_raw("cpu", q, base, u, *per_row, 1.0, 0.01)
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {rows} draws differ from the C++ kernel"
    if filters == dict(top_k=1):
        assert torch.equal(got, (q + 0.01 * base).argmax(-1))


@pytest.mark.parametrize("backend, device", FUSED)
def test_last_uniform_takes_the_last_kept_token(backend, device):
    """u just below 1 must land on the last kept token in vocabulary order (here it holds 20% of the
    mass, so no rounding can move the draw), never on a fallback such as the argmax."""
    vocab = 64
    q = torch.full((1, vocab), -30.0)
    q[0, 5] = 2.0      # the argmax
    q[0, 40] = 0.6137  # the last kept token: ~20% of the mass
    q[0, 10:30] = torch.linspace(-1.0, -0.5, 20)
    q[0, 41:] = NEG_INF  # banned: 40 is the last kept token
    base = torch.zeros(1, vocab)
    u = torch.tensor([1.0 - 2.0 ** -24])
    for kw in (dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
               dict(temperature=1.0, top_k=0, top_p=0.99, min_p=0.0)):
        expected, ambiguous = oracle_tokens(q, base, u, **kw, alpha_tilde=1.0, alpha_0=0.01)
        assert int(expected) == 40 and not ambiguous.any()
        got = run_raw(backend, q.to(device), base.to(device), u.to(device),
                      *[x.to(device) for x in params(1, **kw)], 1.0, 0.01)
        assert int(got) == 40, f"{kw}: got {int(got)}"


# --------------------------------------------------------------------------- 3. greedy


def tie_rows(vocab, dtype):
    """Rows whose combined logits tie exactly at the maximum; expected first index of each."""
    gen = generator(7)
    q = torch.randn(5, vocab, generator=gen)
    base = torch.randn(5, vocab, generator=gen)
    expected = []
    for r, idx in enumerate(([3, 7, 40], [0, vocab - 1], [vocab - 2, vocab - 1])):
        q[r, idx] = 6.0
        base[r, idx] = 0.25
        expected.append(idx[0])
    q[3], base[3] = 0.0, 0.0  # flat row: everything ties
    expected.append(0)
    q[4], base[4] = NEG_INF, 0.0  # all banned but two tied entries
    q[4, [9, 11]] = 1.5
    expected.append(9)
    return q.to(dtype), base.to(dtype), torch.tensor(expected)


@pytest.mark.parametrize("filters", [False, True], ids=["plain", "with-filters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_greedy_is_first_argmax(backend, device, dtype, filters, seed):
    vocab = 64
    q, base = random_rows(8, vocab, seed, dtype=dtype, neg_inf="q")
    tq, tb, tie_expected = tie_rows(vocab, dtype)
    q, base = torch.cat([q, tq]), torch.cat([base, tb])
    kw = dict(top_k=3, top_p=0.5, min_p=0.2) if filters else {}
    got = qk.combined_sample(q.to(device), base.to(device), alpha_tilde=1.0, alpha_0=0.5, temperature=0.0, generator=0, backend=backend,
                             **kw)
    expected = qk.combined_logits(q, base, alpha_tilde=1.0, alpha_0=0.5, backend="torch").argmax(-1)
    assert torch.equal(expected[8:], tie_expected)  # the tie rows really tie in the reference
    assert got.dtype == torch.long
    assert torch.equal(got.cpu(), expected), f"got {got.tolist()}, expected {expected.tolist()}"


# --------------------------------------------------------------------------- 4. seeds


def flat_rows(backend, device):
    rows, vocab = (8, 16) if interpreted(backend, device) else (64, 50)
    return torch.zeros(rows, vocab, device=device), torch.zeros(rows, vocab, device=device)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_same_seed_same_tokens_different_seed_different_tokens(backend, device):
    q, base = flat_rows(backend, device)
    draw = lambda g: qk.combined_sample(q, base, generator=g, backend=backend)  # noqa: E731
    a, b = draw(1234), draw(1234)
    assert torch.equal(a, b), "the same int seed gave different tokens"
    gen_device = device if device != "cpu" else "cpu"
    a, b = draw(torch.Generator(gen_device).manual_seed(99)), draw(torch.Generator(gen_device).manual_seed(99))
    assert torch.equal(a, b), "generators with the same seed gave different tokens"
    assert not torch.equal(draw(1), draw(2)), "different int seeds gave the same tokens"
    g = torch.Generator(gen_device).manual_seed(5)
    assert not torch.equal(draw(g), draw(g)), "one generator gave the same tokens twice: it did not advance"
    assert not torch.equal(draw(torch.Generator(gen_device).manual_seed(1)),
                           draw(torch.Generator(gen_device).manual_seed(2))), "different generator seeds, same tokens"


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_empty_batch(backend, device):
    q = torch.zeros(0, 11, device=device)
    tokens = qk.combined_sample(q, q, top_k=3, top_p=0.5, generator=0, backend=backend)
    assert tokens.shape == (0,) and tokens.dtype == torch.long
    assert qk.combined_logits(q, q, backend=backend).shape == (0, 11)


# --------------------------------------------------------------------------- 5. per-row parameters

MIXED = [
    dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.0),
    dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3),
    dict(temperature=1.3, top_k=0, top_p=0.8, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.1),
    dict(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
    dict(temperature=2.0, top_k=8, top_p=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
]


@pytest.mark.parametrize("backend, device", FUSED)
def test_per_row_parameters_equal_rows_alone(backend, device, seed):
    rows, vocab = len(MIXED), 40
    q, base = random_rows(rows, vocab, seed)
    q, base = q.to(device), base.to(device)
    u = torch.rand(rows, generator=generator(seed)).to(device)
    per_row = [torch.tensor([m[key] for m in MIXED]).to(device) for key in ("temperature", "top_k", "top_p", "min_p")]
    batch = run_raw(backend, q, base, u, *per_row, 1.0, 0.5)
    alone = torch.cat([run_raw(backend, q[r:r + 1], base[r:r + 1], u[r:r + 1],
                               *[x.to(device) for x in params(1, **MIXED[r])], 1.0, 0.5) for r in range(rows)])
    assert torch.equal(batch, alone), f"batch {batch.tolist()} vs rows alone {alone.tolist()}"
    expected, ambiguous = oracle_tokens(q.cpu(), base.cpu(), u.cpu(), *[x.cpu() for x in per_row], 1.0, 0.5)
    assert_tokens_match(batch, expected, ambiguous, backend, min_clear=1.0)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_public_per_row_parameters(backend, device, seed):
    """Through qk.combined_sample: greedy and top_k=1 rows give the argmax, every row stays inside
    its own filtered support, for many seeds."""
    rows, vocab = len(MIXED), 40
    q, base = random_rows(rows, vocab, seed)
    per_row = {key: torch.tensor([m[key] for m in MIXED]) for key in MIXED[0]}
    support = reference.filtered_logits(reference.combined_logits(q.double(), base.double(), alpha_tilde=1.0, alpha_0=0.5),
                                        **{k: v.double() if k != "top_k" else v for k, v in per_row.items()}) > NEG_INF
    argmax = qk.combined_logits(q, base, alpha_tilde=1.0, alpha_0=0.5, backend="torch").argmax(-1)
    deterministic = (per_row["temperature"] == 0) | (per_row["top_k"] == 1)
    for s in range(2 if interpreted(backend, device) else 20):
        got = qk.combined_sample(q.to(device), base.to(device), alpha_tilde=1.0, alpha_0=0.5,
                                 **{k: v.to(device) for k, v in per_row.items()}, generator=s, backend=backend).cpu()
        assert torch.equal(got[deterministic], argmax[deterministic])
        inside = support.gather(1, got[:, None]).squeeze(1)
        assert inside.all(), f"seed {s}: rows {(~inside).nonzero().flatten().tolist()} drew a filtered-out token"


# --------------------------------------------------------------------------- 6. combined_logits


@pytest.mark.parametrize("neg_inf", [None, "q", "base"])
@pytest.mark.parametrize("vocab", [1, 7, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_combined_logits_equals_reference(backend, device, dtype, vocab, neg_inf, seed):
    if vocab == 1 and neg_inf == "base":
        pytest.skip("a single banned base entry leaves no finite row")
    q, base = random_rows(3, vocab, seed, dtype=dtype, neg_inf=neg_inf)
    for at, a0 in ((1.0, 0.01), (0.7, 1.3)):
        got = qk.combined_logits(q.to(device), base.to(device), alpha_tilde=at, alpha_0=a0, backend=backend)
        assert got.dtype == torch.float32 and got.shape == (3, vocab)
        expected = reference.combined_logits(q.double(), base.double(), alpha_tilde=at, alpha_0=a0)
        assert torch.equal(torch.isneginf(got.cpu()), torch.isneginf(expected)), "different -inf pattern"
        assert_close(got, expected, rtol=1e-5, atol=1e-5, what=f"combined_logits at={at} a0={a0}")
    # The defaults are alpha_tilde = 1, alpha_0 = 0.01.
    assert_close(qk.combined_logits(q.to(device), base.to(device), backend=backend),
                 reference.combined_logits(q.double(), base.double(), alpha_tilde=1.0, alpha_0=0.01), rtol=1e-5, atol=1e-5, what="defaults")


def test_combined_logits_strided_input(seed):
    q, base = random_rows(4, 200, seed)
    got = qk.combined_logits(q[:, ::2], base.t().contiguous().t()[:, 1::2], alpha_tilde=1.1, alpha_0=0.4, backend="cpu")
    assert_close(got, reference.combined_logits(q[:, ::2].double(), base[:, 1::2].double(), alpha_tilde=1.1, alpha_0=0.4),
                 rtol=1e-5, atol=1e-5, what="strided")


# --------------------------------------------------------------------------- 7. from hidden states


@pytest.mark.parametrize("two_stream", [False, True], ids=["h_c", "two-stream"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
# The CPU kernel multiplies W tiles by the hidden rows (few rows) or the rows by W tiles (from 16
# rows, where the whole head in one tile is written straight into the combined rows): both ways, in
# one tile and in many.
@pytest.mark.parametrize("backend, device, dtype, budget, rows", [
    pytest.param("cpu", "cpu", torch.float32, None, 16, id="cpu-fp32"),
    pytest.param("cpu", "cpu", torch.float32, 0.001, 16, id="cpu-fp32-tiles"),
    pytest.param("cpu", "cpu", torch.bfloat16, 0.001, 16, id="cpu-bf16-tiles"),
    pytest.param("cpu", "cpu", torch.float32, None, 4, id="cpu-fp32-4rows"),
    pytest.param("cpu", "cpu", torch.float32, 0.001, 4, id="cpu-fp32-4rows-tiles"),
    pytest.param("torch", "cpu", torch.float32, None, 16, id="torch-fp32"),
    pytest.param("triton", "cpu", torch.float32, None, 4, id="triton-interp-fp32", marks=no_interpreter_with_cuda),
])
def test_from_hidden_equals_materialised_logits(backend, device, dtype, budget, rows, bias, two_stream, seed):
    """One head product on h_c (default) or the two streams' rows: the tokens of the two logits rows."""
    hidden, vocab = (16, 40) if interpreted(backend, device) else (32, 300)
    gen = generator(seed)
    ha = torch.randn(rows, hidden, generator=gen).to(dtype)
    hb = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) / 2).to(dtype)
    b = torch.randn(vocab, generator=gen).to(dtype) if bias else None
    kw = dict(alpha_tilde=0.8, alpha_0=0.5, temperature=torch.tensor([0.0, 1.0, 1.3, 0.7] * (rows // 4)),
              top_k=10, top_p=0.9, min_p=0.02)
    got = qk.combined_sample_from_hidden(ha, hb, w, b, **kw, generator=321, backend=backend, tile_budget_mb=budget,
                                         two_stream=two_stream)
    # The logits the fused path never stores, in fp32 (it reads low-precision inputs and accumulates in fp32).
    logits = lambda h: F.linear(h.float(), w.float(), None if b is None else b.float())  # noqa: E731
    expected = qk.combined_sample(logits(ha), logits(hb), **kw, generator=321,
                                  backend="cpu" if backend == "torch" else backend)
    if backend == "torch":  # a different sampler: compare in distribution only, via greedy rows and support
        greedy = kw["temperature"] == 0
        assert torch.equal(got[greedy], expected[greedy])
        z = reference.filtered_logits(reference.combined_logits(logits(ha), logits(hb), alpha_tilde=0.8, alpha_0=0.5),
                                      temperature=kw["temperature"], top_k=10, top_p=0.9, min_p=0.02)
        assert bool((z.gather(1, got[:, None]) > NEG_INF).all())
        return
    assert got.dtype == torch.long
    assert torch.equal(got, expected), f"got {got.tolist()}, expected {expected.tolist()}"


# --------------------------------------------------------------------------- 8. bad input


def sample_args(device):
    q, base, _ = make_rows(3, 13, seed=21)
    return dict(q_logits=q.to(device), base_logits=base.to(device))


def _set(**changes):
    return lambda a: a.update(changes)


def _poke(name, index, value):
    def mutate(a):
        t = a[name].clone()
        t[index] = value
        a[name] = t
    return mutate


BAD_ROW = r"q_logits or base_logits.*row 1"
BAD_CASES = {
    "top_p = 0": (_set(top_p=0.0), ValueError, r"top_p"),
    "top_p = 1.5": (_set(top_p=1.5), ValueError, r"top_p"),
    "top_p = nan": (_set(top_p=float("nan")), ValueError, r"top_p"),
    "top_p tensor with 0": (_set(top_p=torch.tensor([0.5, 0.0, 1.0])), ValueError, r"top_p"),
    "top_k = -1": (_set(top_k=-1), ValueError, r"top_k"),
    "top_k = 2.5": (_set(top_k=2.5), TypeError, r"top_k"),
    "top_k = 2.0": (_set(top_k=2.0), TypeError, r"top_k"),
    "top_k float tensor": (_set(top_k=torch.tensor([1.0, 2.0, 3.0])), TypeError, r"top_k"),
    "top_k tensor with -1": (_set(top_k=torch.tensor([1, -1, 3])), ValueError, r"top_k"),
    "temperature = -0.1": (_set(temperature=-0.1), ValueError, r"temperature"),
    "temperature = inf": (_set(temperature=float("inf")), ValueError, r"temperature"),
    "temperature tensor negative": (_set(temperature=torch.tensor([1.0, -0.1, 0.0])), ValueError, r"temperature"),
    "temperature tensor with inf": (_set(temperature=torch.tensor([1.0, float("inf"), 1.0])), ValueError,
                                    r"temperature"),  # as the scalar inf is
    "temperature a string": (_set(temperature="1.0"), TypeError, r"temperature"),
    "min_p = 1.0": (_set(min_p=1.0), ValueError, r"min_p"),
    "min_p = -0.1": (_set(min_p=-0.1), ValueError, r"min_p"),
    "min_p tensor with 1.0": (_set(min_p=torch.tensor([0.0, 0.1, 1.0])), ValueError, r"min_p"),
    "top_p tensor wrong length": (_set(top_p=torch.tensor([0.5, 0.9])), ValueError, r"top_p"),
    "top_k tensor wrong length": (_set(top_k=torch.tensor([1, 2, 3, 4])), ValueError, r"top_k"),
    "temperature tensor [B, 1]": (_set(temperature=torch.ones(3, 1)), ValueError, r"temperature"),
    "min_p tensor on another device": (_set(min_p=torch.zeros(3, device="meta")), ValueError, r"min_p is on meta"),
    "row all -inf in q_logits": (_poke("q_logits", 1, NEG_INF), ValueError, BAD_ROW),
    "row all -inf in base_logits": (_poke("base_logits", 1, NEG_INF), ValueError, BAD_ROW),
    "NaN in q_logits": (_poke("q_logits", (1, 4), float("nan")), ValueError, BAD_ROW),
    "NaN in base_logits": (_poke("base_logits", (1, 0), float("nan")), ValueError, BAD_ROW),
    "NaN in a greedy row": (lambda a: (_poke("q_logits", (1, 4), float("nan"))(a), a.update(temperature=0.0)),
                            ValueError, BAD_ROW),
    "+inf in q_logits": (_poke("q_logits", (1, 12), float("inf")), ValueError, BAD_ROW),
    "+inf in base_logits": (_poke("base_logits", (1, 2), float("inf")), ValueError, BAD_ROW),
    "shape mismatch": (lambda a: a.update(base_logits=a["base_logits"][:, :-1]), ValueError, r"base_logits"),
    "dtype mismatch": (lambda a: a.update(base_logits=a["base_logits"].double()), TypeError, r"base_logits"),
    "3-D logits": (lambda a: a.update(q_logits=a["q_logits"][None], base_logits=a["base_logits"][None]),
                   ValueError, r"q_logits"),
    "1-D logits": (lambda a: a.update(q_logits=a["q_logits"][0], base_logits=a["base_logits"][0]),
                   ValueError, r"q_logits"),
    "V = 0": (lambda a: a.update(q_logits=a["q_logits"][:, :0], base_logits=a["base_logits"][:, :0]),
              ValueError, r"q_logits"),
    "integer q_logits": (lambda a: a.update(q_logits=a["q_logits"].long()), TypeError, r"q_logits"),
    "generator a string": (_set(generator="42"), TypeError, r"generator"),
    "generator a float": (_set(generator=1.5), TypeError, r"generator"),
    "generator a bool": (_set(generator=True), TypeError, r"generator"),
    "alpha_tilde = 0": (_set(alpha_tilde=0.0), ValueError, r"alpha_tilde"),
    "alpha_0 < 0": (_set(alpha_0=-1.0), ValueError, r"alpha_0"),
    "bad backend": (_set(backend="cuda"), ValueError, r"backend"),
}


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_sample_valid_call(backend, device):
    tokens = call_with_backend(qk.combined_sample, sample_args(device), backend)
    assert tokens.shape == (3,) and tokens.dtype == torch.long and bool(((tokens >= 0) & (tokens < 13)).all())


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_sample_rejects(backend, device, case):
    mutate, exc, pattern = BAD_CASES[case]
    args = sample_args(device)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call_with_backend(qk.combined_sample, args, backend)


COMBINED_NONFINITE = {  # (which input, where, value): the output has a row without a finite maximum
    "NaN in q_logits": ("q_logits", (1, 4), float("nan")),
    "+inf in q_logits": ("q_logits", (0, 2), float("inf")),
    "NaN in base_logits": ("base_logits", (2, 0), float("nan")),
    "+inf in base_logits": ("base_logits", (1, 7), float("inf")),
    "row of -inf in q_logits": ("q_logits", (2, slice(None)), float("-inf")),
    "row of -inf in base_logits": ("base_logits", (0, slice(None)), float("-inf")),
}


@pytest.mark.parametrize("case", list(COMBINED_NONFINITE))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_combined_logits_rejects_nonfinite_input(backend, device, case):
    """combined_logits returned NaN silently for NaN / +inf input (found by the property harness):
    now a ValueError naming both logits, as every other public op raises."""
    name, where, value = COMBINED_NONFINITE[case]
    args = sample_args(device)
    args = {"q_logits": args["q_logits"].clone(), "base_logits": args["base_logits"].clone()}
    args[name][where] = value
    with pytest.raises(ValueError, match=r"q_logits or base_logits: the logits hold NaN or \+inf"):
        qk.combined_logits(**args, backend=backend)
    clean = sample_args(device)  # a banned token alone is fine
    clean["q_logits"][0, 1] = float("-inf")
    out = qk.combined_logits(clean["q_logits"], clean["base_logits"], backend=backend)
    assert out[0, 1] == float("-inf") and torch.isfinite(out[1:]).all()


def test_zero_alpha_0_with_a_neg_inf_base_logit_says_so():
    """alpha_0 = 0 times a -inf base logit is NaN inside y: the error names that cause (the inputs
    hold no NaN), and with alpha_0 > 0 the same input is fine."""
    q, base = torch.tensor([[0.5, 2.0, 1.0]]), torch.tensor([[0.0, float("-inf"), 1.0]])
    with pytest.raises(ValueError, match=r"alpha_0 = 0 with a -inf base logit.*finfo"):
        qk.residual_q_values(q, base, torch.tensor([0]), alpha_0=0.0)
    with pytest.raises(ValueError, match=r"alpha_0 = 0 with a -inf base logit"):
        qk.combined_sample(q, base, alpha_0=0.0)
    values, _ = qk.residual_q_values(q, base, torch.tensor([0]), alpha_0=0.5)
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("case", ["3-D logits", "shape mismatch", "dtype mismatch", "bad backend", "alpha_tilde = 0"])
def test_combined_logits_rejects(case):
    mutate, exc, pattern = BAD_CASES[case]
    args = sample_args("cpu")
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call_with_backend(qk.combined_logits, args, "cpu")


def hidden_args():
    gen = generator(5)
    return dict(adapter_hidden=torch.randn(3, 8, generator=gen), base_hidden=torch.randn(3, 8, generator=gen),
                lm_head_weight=torch.randn(13, 8, generator=gen), lm_head_bias=torch.randn(13, generator=gen))


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_samplers_take_tensors_that_require_grad(backend, device):
    """Hidden states, an LM head or a bias that require grad (model.lm_head.weight,
    as the README passes it), outside no_grad, sample like their detached copies and build no graph."""
    plain = {k: v.to(device) for k, v in hidden_args().items()}
    tracked = {k: v.clone().requires_grad_() for k, v in plain.items()}
    keywords = dict(alpha_tilde=0.8, alpha_0=0.4, temperature=0.9, top_k=7, top_p=0.95, backend=backend)
    tokens = qk.combined_sample_from_hidden(**tracked, generator=3, **keywords)
    assert not tokens.requires_grad and tokens.grad_fn is None
    assert torch.equal(tokens, qk.combined_sample_from_hidden(**plain, generator=3, **keywords))
    q, base = (F.linear(plain[h], plain["lm_head_weight"], plain["lm_head_bias"]) for h in ("adapter_hidden", "base_hidden"))
    tokens = qk.combined_sample(q.clone().requires_grad_(), base.clone().requires_grad_(), generator=3, **keywords)
    assert not tokens.requires_grad
    assert torch.equal(tokens, qk.combined_sample(q, base, generator=3, **keywords))


HIDDEN_CASES = {
    "weight H mismatch": (lambda a: a.update(lm_head_weight=a["lm_head_weight"][:, :-1]), ValueError,
                          r"lm_head_weight"),
    "bias shape": (lambda a: a.update(lm_head_bias=a["lm_head_bias"][:-1]), ValueError, r"lm_head_bias"),
    "base_hidden shape": (lambda a: a.update(base_hidden=a["base_hidden"][:2]), ValueError, r"base_hidden"),
    "weight dtype": (lambda a: a.update(lm_head_weight=a["lm_head_weight"].double()), TypeError, r"lm_head_weight"),
    "3-D hidden": (lambda a: a.update(adapter_hidden=a["adapter_hidden"][None], base_hidden=a["base_hidden"][None]),
                   ValueError, r"adapter_hidden"),
    "top_p = 0": (_set(top_p=0.0), ValueError, r"top_p"),
    "top_k = 2.5": (_set(top_k=2.5), TypeError, r"top_k"),
    "min_p tensor wrong length": (_set(min_p=torch.zeros(2)), ValueError, r"min_p"),
    "generator a string": (_set(generator="42"), TypeError, r"generator"),
    "bad backend": (_set(backend="gpu"), ValueError, r"backend"),
}


@pytest.mark.parametrize("case", list(HIDDEN_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_from_hidden_rejects(backend, device, case):
    mutate, exc, pattern = HIDDEN_CASES[case]
    args = hidden_args()
    assert call_with_backend(qk.combined_sample_from_hidden, args, "cpu").shape == (3,)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call_with_backend(qk.combined_sample_from_hidden, args, backend)


# --------------------------------------------------------------------------- 9. opcheck and torch.compile


def raw_sample_args(seed, rows=4, vocab=33):
    q, base = random_rows(rows, vocab, seed, neg_inf="q")
    return (q, base, torch.rand(rows, generator=generator(seed)), torch.tensor([0.0, 1.0, 0.7, 1.3][:rows]),
            torch.tensor([0, 5, 0, 10][:rows]), torch.tensor([1.0, 0.9, 0.8, 0.95][:rows]),
            torch.tensor([0.0, 0.0, 0.1, 0.05][:rows]))


def test_opcheck(seed):
    q, base = random_rows(4, 33, seed, neg_inf="base")
    torch.library.opcheck(OP.combined_logits.default, (q, base, 0.9, 0.3))
    args = raw_sample_args(seed)
    torch.library.opcheck(OP.combined_sample.default, (*args, 1.0, 0.01))
    gen = generator(seed)
    ha, hb = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    w, b = torch.randn(33, 8, generator=gen), torch.randn(33, generator=gen)
    for bias in (None, b):
        for two_stream in (False, True):
            torch.library.opcheck(OP.combined_sample_from_hidden.default,
                                  (ha, hb, w, bias, *args[2:], 1.0, 0.01, 16, two_stream))


def test_compiled_raw_op_matches_eager(seed):
    torch._dynamo.reset()

    def sample(q, base, u, t, k, p, mp):
        return OP.combined_sample(q, base, u, t, k, p, mp, 0.9, 0.5)

    args = raw_sample_args(seed)
    compiled = torch.compile(sample, fullgraph=True)
    eager = sample(*args)
    assert torch.equal(compiled(*args), eager)
    # The uniforms are data, not baked into the graph: new uniforms, new (still equal) tokens.
    args2 = (*args[:2], torch.rand(4, generator=generator(seed + 1)), *args[3:])
    assert torch.equal(compiled(*args2), sample(*args2))


def test_combined_logits_gradient_reaches_q_only():
    """d combined / dQ = 1 / alpha_tilde, as the reference's autograd says; the frozen base gets none.

    (No float64 gradcheck: combined_logits returns fp32 whatever the input dtype.)
    """
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 11, generator=gen, requires_grad=True)
    base = torch.randn(3, 11, generator=gen, requires_grad=True)
    upstream = torch.randn(3, 11, generator=gen)
    (qk.combined_logits(q, base, alpha_tilde=0.7, alpha_0=0.3, backend="cpu") * upstream).sum().backward()
    q_ref = q.detach().clone().requires_grad_()
    (reference.combined_logits(q_ref, base.detach(), alpha_tilde=0.7, alpha_0=0.3) * upstream).sum().backward()
    torch.testing.assert_close(q.grad, q_ref.grad)
    assert base.grad is None
    torch.library.opcheck(torch.ops.qadapter.combined_logits.default,
                          (q.detach().float().requires_grad_(), base.detach().float(), 0.7, 0.3))
