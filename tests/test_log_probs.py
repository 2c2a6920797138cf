"""combined_log_probs_from_hidden: log pi~(token) of the customised policy from hidden states.

Checked against the two-stream reference (two logits rows through ``F.linear``, then
``reference.combined_log_probs`` = log_softmax((Q + alpha_0 log_softmax(L)) / alpha_tilde)[token]
in fp64) on fresh random inputs, odd shapes, tiles smaller than the vocabulary, extreme scales,
with and without bias; plus bad input through the public function and the raw op.
"""
import pytest
import torch
import torch.nn.functional as F

import qadapter_kernels as qk
from qadapter_kernels import reference

from helpers import ALL_BACKENDS, FUSED, generator, interpreted

OP = torch.ops.qadapter
ALPHAS = dict(alpha_tilde=0.7, alpha_0=0.4)


def make_inputs(rows, hidden, vocab, seed, dtype=torch.float32, bias=True, scale=1.0, device="cpu"):
    gen = generator(seed)
    ha = torch.randn(rows, hidden, generator=gen) * scale
    hb = ha + 0.5 * torch.randn(rows, hidden, generator=gen) * scale
    w = torch.randn(vocab, hidden, generator=gen) * (3 / hidden**0.5)
    b = torch.randn(vocab, generator=gen) if bias else None
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    to = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return to(ha), to(hb), to(w), to(b), tokens.to(device)


def two_stream_reference(ha, hb, w, b, tokens, **alphas):
    """fp64 log-probs from the two materialised logits rows (the definition, not the identity)."""
    logits = lambda h: F.linear(h.double(), w.double(), None if b is None else b.double())  # noqa: E731
    return reference.combined_log_probs(logits(ha), logits(hb), tokens, **alphas)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_equals_the_two_stream_reference(backend, device, dtype, bias, seed):
    rows, hidden, vocab = (5, 24, 70) if interpreted(backend, device) else (37, 40, 301)
    ha, hb, w, b, tokens = make_inputs(rows, hidden, vocab, seed, dtype, bias, device=device)
    got = qk.combined_log_probs_from_hidden(ha, hb, w, tokens, b, **ALPHAS, backend=backend)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # bf16 inputs are exact in fp32, so the reference reads the same numbers; the rest is fp32 rounding.
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double().cpu(), two_stream_reference(ha, hb, w, b, tokens, **ALPHAS).cpu(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("budget", [None, 0.002], ids=["one-tile", "many-tiles"])
def test_cpu_row_and_vocab_tiles(rows, budget, seed):
    """A single row (fed twice to the product) and tiles narrower than the vocabulary."""
    ha, hb, w, b, tokens = make_inputs(rows, 16, 1001, seed)
    tokens[0] = 1000  # the last column of the last, partial tile
    got = qk.combined_log_probs_from_hidden(ha, hb, w, tokens, b, **ALPHAS, tile_budget_mb=budget)
    torch.testing.assert_close(got.double(), two_stream_reference(ha, hb, w, b, tokens, **ALPHAS), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend, device", FUSED)
def test_extreme_scales(backend, device, seed):
    """Logits of +-1e4: log-probabilities of -2e4 stay finite and exact to fp32 rounding."""
    ha, hb, w, b, tokens = make_inputs(4, 16, 50, seed, scale=3e3, device=device)
    got = qk.combined_log_probs_from_hidden(ha, hb, w, tokens, b, **ALPHAS, backend=backend)
    expected = two_stream_reference(ha, hb, w, b, tokens, **ALPHAS)
    assert expected.abs().max() > 1e3
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-2)


def test_leading_shape_and_probabilities_sum_to_one(seed):
    """Hidden states [B, T, H] with tokens [B, T]; over every token of a row the probabilities sum to 1."""
    ha, hb, w, b, _ = make_inputs(6, 16, 40, seed)
    every = torch.arange(40)
    got = qk.combined_log_probs_from_hidden(ha[:, None].expand(6, 40, 16), hb[:, None].expand(6, 40, 16), w,
                                            every.expand(6, 40), b, **ALPHAS)
    assert got.shape == (6, 40)
    torch.testing.assert_close(got.double().exp().sum(-1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", FUSED)
def test_raw_op_gives_nan_for_an_out_of_range_token(backend, device):
    """With value checks off (the raw op) a bad id is NaN at its position, never an out-of-bounds read."""
    ha, hb, w, b, tokens = make_inputs(4, 8, 30, 3, device=device)
    tokens[1], tokens[2] = -1, 30
    if backend == "cpu":
        got = OP.combined_log_probs_from_hidden(ha, hb, w, b, tokens, 0.7, 0.4, 4, 16)
    else:
        from qadapter_kernels.ops.log_probs import log_probs_from_hidden_rows
        got = log_probs_from_hidden_rows(ha, hb, w, b, tokens, 0.7, 0.4, 4, 16, via_dispatcher=False)
    assert got[1:3].isnan().all() and got[[0, 3]].isfinite().all()


def public_args():
    ha, hb, w, b, tokens = make_inputs(3, 8, 13, 5)
    return dict(adapter_hidden=ha, base_hidden=hb, lm_head_weight=w, tokens=tokens, lm_head_bias=b)


def _set(**changes):
    return lambda a: a.update(changes)


BAD = {
    "token too large": (lambda a: a["tokens"].__setitem__(1, 13), ValueError, r"tokens must be token ids in \[0, 13\)"),
    "token negative": (lambda a: a["tokens"].__setitem__(0, -1), ValueError, r"tokens"),
    "float tokens": (lambda a: a.update(tokens=a["tokens"].float()), TypeError, r"tokens"),
    "tokens shape": (lambda a: a.update(tokens=a["tokens"][:2]), ValueError, r"tokens"),
    "NaN hidden": (lambda a: a["adapter_hidden"].__setitem__((0, 0), float("nan")), ValueError, r"NaN"),
    "inf weight": (lambda a: a["lm_head_weight"].__setitem__((4, 2), float("inf")), ValueError, r"NaN or inf"),
    "weight H mismatch": (lambda a: a.update(lm_head_weight=a["lm_head_weight"][:, :-1]), ValueError, r"lm_head_weight"),
    "bias shape": (lambda a: a.update(lm_head_bias=a["lm_head_bias"][:-1]), ValueError, r"lm_head_bias"),
    "weight dtype": (lambda a: a.update(lm_head_weight=a["lm_head_weight"].double()), TypeError, r"lm_head_weight"),
    "alpha_tilde 0": (_set(alpha_tilde=0.0), ValueError, r"alpha_tilde"),
    "bad backend": (_set(backend="gpu"), ValueError, r"backend"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_bad_input_names_the_argument(backend, device, case):
    mutate, exc, pattern = BAD[case]
    args = public_args()
    assert qk.combined_log_probs_from_hidden(**args, backend=backend).shape == (3,)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        qk.combined_log_probs_from_hidden(**{"backend": backend, **args})


RAW_BAD = {
    "int32 tokens": (lambda a: a.__setitem__(4, a[4].int()), TypeError, r"tokens"),
    "tokens length": (lambda a: a.__setitem__(4, a[4][:2]), ValueError, r"tokens"),
    "base_hidden shape": (lambda a: a.__setitem__(1, a[1][:2]), ValueError, r"base_hidden"),
    "weight H": (lambda a: a.__setitem__(2, a[2][:, :-1]), ValueError, r"weight"),
    "bias length": (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, r"bias"),
    "tile 0": (lambda a: a.__setitem__(7, 0), ValueError, r"tile"),
}


@pytest.mark.parametrize("case", list(RAW_BAD))
def test_raw_cpu_op_checks_sizes(case):
    """Called directly (no Python checks) the C++ kernel still refuses what it would index wrongly."""
    mutate, exc, pattern = RAW_BAD[case]
    ha, hb, w, b, tokens = make_inputs(3, 8, 13, 5)
    args = [ha, hb, w, b, tokens, 0.7, 0.4, 4, 16]
    mutate(args)
    with pytest.raises(exc, match=pattern):
        OP.combined_log_probs_from_hidden(*args)


def test_opcheck(seed):
    ha, hb, w, b, tokens = make_inputs(4, 8, 33, seed)
    for bias in (None, b):
        torch.library.opcheck(OP.combined_log_probs_from_hidden.default, (ha, hb, w, bias, tokens, 0.9, 0.3, 4, 16))
