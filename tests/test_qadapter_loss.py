"""qk.qadapter_loss against reference.qadapter_loss, and the reference against docs/DESIGN.md itself.

Every output (loss, pref_loss, reg_loss, chosen/rejected scores, accuracy) and the q_logits
gradient of a random linear combination of all differentiable outputs are compared, for both
reward variants, every length normalisation, several hyper-parameters, fp32 and bf16.
"""
import math

import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels import reference
from qadapter_kernels.params import LengthNorm, RewardVariant

from helpers import (
    ALL_BACKENDS,
    BAD_T,
    BAD_V,
    COMMON_CASES,
    DIFF_FIELDS,
    FUSED,
    GRAD_TOL,
    LOSS_FIELDS,
    VALUE_TOL,
    assert_close,
    call_with_backend,
    interpreted,
    leaf,
    loss_args,
    make_pair_batch,
    on_meta,
    poke_arg,
    random_weights,
    requires_cuda,
    run_loss,
    set_arg,
)

VARIANTS = [v.value for v in RewardVariant]
HYPER = {  # alpha_tilde, alpha_0, gamma, beta
    "defaults": dict(alpha_tilde=1.0, alpha_0=0.01, gamma=1.0, beta=0.1),
    "mixed": dict(alpha_tilde=0.5, alpha_0=0.3, gamma=0.9, beta=0.5),
    "edges": dict(alpha_tilde=2.0, alpha_0=0.0, gamma=0.0, beta=0.0),
    "strong-base": dict(alpha_tilde=1.3, alpha_0=1.0, gamma=0.97, beta=2.0),
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def check_loss(batch, backend, device, *, dtype=torch.float32, value_tol=VALUE_TOL, grad_tol=None,
               seed=0, **kwargs):
    """Fused vs reference on the same ``dtype`` inputs (the reference upcasts them to fp32)."""
    low = batch.to(dtype=dtype)
    out, grad = run_loss(low.to(device), qk.qadapter_loss, backend=backend, grad_seed=seed, **kwargs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref, ref_grad = run_loss(low, reference.qadapter_loss, q_dtype=acc, grad_seed=seed, **kwargs)

    assert isinstance(out, qk.QAdapterLossOutput)
    for name in LOSS_FIELDS:
        got, expected = getattr(out, name), getattr(ref, name)
        assert got.dtype == acc, f"{name} dtype {got.dtype}"
        assert got.device.type == torch.device(device).type
        if name == "accuracy":  # a fraction of pairs: exact (random scores are far from ties)
            assert_close(got, expected, rtol=0, atol=0, what=name)
            assert torch.equal(got, (out.chosen_scores > out.rejected_scores).to(acc).mean())
        else:
            assert_close(got, expected, **value_tol, what=name)
    assert out.chosen_scores.shape == (batch.B,) and out.rejected_scores.shape == (batch.B,)
    assert out.loss.shape == () and not out.accuracy.requires_grad
    assert_close(out.loss, out.pref_loss + out.reg_loss, rtol=1e-6, atol=1e-6, what="loss = pref + reg")

    assert grad.dtype == dtype and grad.shape == batch.q_logits.shape
    assert_close(grad, ref_grad, **(grad_tol or scaled_grad_tol(dtype, ref_grad)), what="dQ")
    # Positions that feed no scored reward get exactly zero (the kernels skip them).
    dead = (ref_grad == 0).all(dim=-1)
    assert torch.equal(grad.cpu()[dead], torch.zeros_like(grad.cpu()[dead]))
    return out, ref


def scaled_grad_tol(dtype, ref_grad: torch.Tensor) -> dict:
    """At the taken action dQ = g_q + g_V * pi~[a], two terms that can nearly cancel (the
    official reward is Q[a] - gamma V(s) of the same state): there the error is relative to the
    terms, not the sum. The absolute tolerance is therefore a small fraction of the largest
    gradient entry (1e-6 of it: a few fp32 exp() roundings; bf16 inputs are reduced in fp32 too
    and only the result is rounded, which the relative tolerance covers), on top of the relative one."""
    tol = dict(GRAD_TOL[dtype])
    tol["atol"] = max(tol["atol"], 1e-6 * ref_grad.abs().max().item())
    return tol


def small_shape(backend, device):
    """(B, T, V): medium for compiled kernels, small for the interpreter."""
    return (2, 9, 130) if interpreted(backend, device) else (3, 17, 1031)


@pytest.mark.parametrize("hyper", list(HYPER))
@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", FUSED)
def test_matches_reference(backend, device, dtype, variant, length_norm, hyper, seed):
    batch = make_pair_batch(*small_shape(backend, device), seed=seed)
    check_loss(batch, backend, device, dtype=dtype, seed=seed, variant=variant, length_norm=length_norm,
               **HYPER[hyper])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", [p for p in FUSED if p.id != "triton-interp"])
def test_realistic_shape(backend, device, dtype, variant, seed):
    """[2B, T, V] = [4, 128, 32000]: a Llama-sized vocabulary."""
    batch = make_pair_batch(2, 128, 32000, seed=seed)
    check_loss(batch, backend, device, dtype=dtype, seed=seed, variant=variant)


def odd_batch(case: str, backend: str, device: str, seed: int):
    B, T, V = small_shape(backend, device)
    if case == "T=2":  # one action per row; rows 1 and 3 start their response at column 0
        return make_pair_batch(2, 2, V, seed=seed, prompt_lens=[1, 0, 1, 0], response_lens=[1, 2, 0, 1])
    if case == "B=1":
        return make_pair_batch(1, T, V, seed=seed)
    if case == "empty-rows":  # row 1 (chosen) has no response; so has pair 2 on both sides
        p = [2, 3, 1] * 2
        r = [T - 2, 0, 0, 4, 5, 0]
        return make_pair_batch(3, T, V, seed=seed, prompt_lens=p, response_lens=r)
    if case == "full-rows":  # no padding at all: every response runs to the last column
        p = [1, 3, 2] * 2
        return make_pair_batch(3, T, V, seed=seed, prompt_lens=p, response_lens=[T - x for x in p])
    if case == "ragged":  # every row a different length, one single-token response
        return make_pair_batch(2, T, V, seed=seed, prompt_lens=[2, 1, 2, 1], response_lens=[1, T - 1, T - 3, 3])
    if case == "banned-tokens":
        return make_pair_batch(B, T, V, seed=seed, neg_inf="both")
    raise AssertionError(case)


ODD_CASES = ["T=2", "B=1", "empty-rows", "full-rows", "ragged", "banned-tokens"]


@pytest.mark.parametrize("case", ODD_CASES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", FUSED)
def test_odd_batches(backend, device, variant, case, seed):
    batch = odd_batch(case, backend, device, seed)
    check_loss(batch, backend, device, seed=seed, variant=variant, alpha_0=0.2, gamma=0.95)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", FUSED)
def test_large_magnitudes(backend, device, dtype, variant, seed):
    """+-1e4 offsets on every position's logits (random sign per position): rewards ~1e4, the
    regulariser ~1e7, sigmoids saturated. At 1e4 one fp32 ulp is ~1e-3, so values and rewards
    carry ~1e-3 absolute rounding that depends on the order of operations."""
    offset = 1e4
    batch = make_pair_batch(*small_shape(backend, device), seed=seed, offset=offset)
    eps = torch.finfo(torch.float32).eps
    grad_tol = dict(GRAD_TOL[dtype])
    # dQ at the taken actions carries 2 beta / n times the reward's rounding, plus, with summed
    # scores (the default length_norm="none"), the margin's own rounding through the sigmoid.
    grad_tol["atol"] = 3e-5
    check_loss(batch, backend, device, dtype=dtype, seed=seed, variant=variant,
               value_tol=dict(rtol=1e-5, atol=16 * eps * offset), grad_tol=grad_tol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", FUSED)
def test_fp16(backend, device, variant, seed):
    batch = make_pair_batch(*small_shape(backend, device), seed=seed)
    check_loss(batch, backend, device, dtype=torch.float16, seed=seed, variant=variant, alpha_0=0.1)


@pytest.mark.parametrize("layout", ["vocab-slice", "time-stride"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_non_contiguous_logits(backend, device, layout, seed):
    """Logits that are views: a slice of a wider vocabulary (rows keep a stride != V through
    the reshape to [2B*T, V]) and every other time step (the reshape must copy)."""
    B, T, V = small_shape(backend, device)
    wide = make_pair_batch(B, 2 * T if layout == "time-stride" else T, V + 7, seed=seed).to(device)
    if layout == "vocab-slice":
        q, base, ids, mask = wide.q_logits[..., :V], wide.base_logits[..., :V], wide.input_ids % V, wide.loss_mask
    else:
        q, base = wide.q_logits[:, ::2], wide.base_logits[:, ::2]
        ids, mask = wide.input_ids[:, ::2], wide.loss_mask[:, ::2]
    assert not q.is_contiguous()
    out = qk.qadapter_loss(leaf(q), base, ids, mask, backend=backend, variant="official")
    # the same values, contiguous, through the reference
    expected = reference.qadapter_loss(q.contiguous(), base.contiguous(), ids, mask, variant="official")
    assert q.data_ptr() == wide.q_logits.data_ptr()  # still a view of the wider buffer
    for name in LOSS_FIELDS:
        assert_close(getattr(out, name), getattr(expected, name), **VALUE_TOL, what=name)
    q_k, q_r = leaf(q), leaf(q.contiguous())
    qk.qadapter_loss(q_k, base, ids, mask, backend=backend).loss.backward()
    reference.qadapter_loss(q_r, base.contiguous(), ids, mask).loss.backward()
    assert_close(q_k.grad, q_r.grad, **scaled_grad_tol(torch.float32, q_r.grad), what="dQ")


@pytest.mark.parametrize("case", ["T=1100", "B=1030"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_past_one_triton_block(backend, device, case, seed):
    """T and B past the Triton pair kernels' 1024-wide blocks (they loop over blocks). B = 1030
    is 2060 pair-pass programs, ~15 s in the interpreter: it runs on the C++ path and CUDA."""
    if case == "B=1030" and interpreted(backend, device):
        pytest.skip("too slow in the Triton interpreter; covered on CUDA")
    B, T, V = (1, 1100, 2) if case == "T=1100" else (1030, 3, 5)
    if case == "T=1100" and not interpreted(backend, device):
        V = 64
    batch = make_pair_batch(B, T, V, seed=seed)
    for variant in VARIANTS:
        check_loss(batch, backend, device, seed=seed, variant=variant, gamma=0.9)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "no-grad-input"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_without_autograd(backend, device, mode, seed):
    """Evaluation: under no_grad / inference_mode, or on logits that do not require grad."""
    batch = make_pair_batch(*small_shape(backend, device), seed=seed).to(device)
    args = (batch.base_logits, batch.input_ids, batch.loss_mask)
    expected = qk.qadapter_loss(leaf(batch.q_logits), *args, backend=backend)
    if mode == "no-grad-input":
        out = qk.qadapter_loss(batch.q_logits.detach(), *args, backend=backend)
    else:
        with getattr(torch, mode)():
            out = qk.qadapter_loss(leaf(batch.q_logits), *args, backend=backend)
    assert not out.loss.requires_grad
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(out, name), getattr(expected, name).detach()), name


@pytest.mark.parametrize("backend, device", FUSED)
def test_integer_mask_and_int32_ids(backend, device, seed):
    """loss_mask as 0/1 integers and int32 input_ids give exactly the bool / int64 result."""
    batch = make_pair_batch(*small_shape(backend, device), seed=seed)
    q, base = batch.q_logits.to(device), batch.base_logits.to(device)
    ids, mask = batch.input_ids.to(device), batch.loss_mask.to(device)
    expected = qk.qadapter_loss(q, base, ids, mask, backend=backend)
    got = qk.qadapter_loss(q, base, ids.int(), mask.to(torch.uint8), backend=backend)
    got_long_mask = qk.qadapter_loss(q, base, ids, mask.long(), backend=backend)
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
        assert torch.equal(getattr(got_long_mask, name), getattr(expected, name)), name


@pytest.mark.parametrize("backend, device", FUSED)
def test_base_logits_get_no_gradient(backend, device, seed):
    batch = make_pair_batch(*small_shape(backend, device), seed=seed).to(device)
    q, base = leaf(batch.q_logits), leaf(batch.base_logits)
    qk.qadapter_loss(q, base, batch.input_ids, batch.loss_mask, backend=backend).loss.backward()
    assert base.grad is None and q.grad is not None


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("hyper", ["defaults", "mixed", "strong-base"])
@pytest.mark.parametrize("shape", [(1, 5, 11), (3, 17, 257), (2, 64, 4000)], ids=str)
def test_official_variant_is_the_authors_formula(shape, hyper, seed):
    """reference.authors_qadapter_loss (their code, log_softmax + cross-entropy) equals the
    "official" variant with length normalisation, and so do its gradients and the C++ kernel."""
    batch = make_pair_batch(*shape, seed=seed)
    h = HYPER[hyper]
    q_a, q_o, q_k = leaf(batch.q_logits.clone()), leaf(batch.q_logits.clone()), leaf(batch.q_logits.clone())
    authors = reference.authors_qadapter_loss(q_a, batch.base_logits, batch.input_ids, batch.loss_mask, **h)
    official = reference.qadapter_loss(q_o, batch.base_logits, batch.input_ids, batch.loss_mask, **h,
                                       variant="official", length_norm=True)
    fused = qk.qadapter_loss(q_k, batch.base_logits, batch.input_ids, batch.loss_mask, **h,
                             variant="official", length_norm=True, backend="cpu")
    bellman = reference.qadapter_loss(batch.q_logits, batch.base_logits, batch.input_ids, batch.loss_mask, **h)
    assert_close(official.loss, authors, rtol=1e-5, atol=1e-6, what="official vs authors")
    assert_close(fused.loss, authors, rtol=1e-5, atol=1e-6, what="fused official vs authors")
    # The variants differ: a test that cannot tell them apart would prove nothing.
    assert not torch.allclose(bellman.loss, authors, rtol=1e-3)
    for q in (q_a, q_o, q_k):
        q.grad = None
    authors.backward()
    official.loss.backward()
    fused.loss.backward()
    tol = scaled_grad_tol(torch.float32, q_a.grad)
    assert_close(q_o.grad, q_a.grad, **tol, what="dQ official vs authors")
    assert_close(q_k.grad, q_a.grad, **tol, what="dQ fused official vs authors")


# A tiny example worked out by hand from docs/DESIGN.md §2 (not from the reference's code).
# B = 1 pair, T = 4, V = 3.
HAND_Q = [
    [[0.5, -1.0, 2.0], [1.5, 0.0, -0.5], [-2.0, 1.0, 0.25], [0.0, 3.0, -1.0]],  # chosen
    [[1.0, 0.5, -0.5], [-1.5, 2.5, 0.75], [0.3, -0.7, 1.1], [2.0, -2.0, 0.0]],  # rejected
]
HAND_L = [
    [[1.0, 0.0, -1.0], [0.2, 0.4, 0.6], [-3.0, 0.0, 3.0], [0.5, 0.5, 0.5]],
    [[0.0, 2.0, 1.0], [1.0, -1.0, 0.0], [0.25, 0.5, -0.25], [-1.0, 1.0, 2.0]],
]
HAND_IDS = [[2, 0, 1, 1], [2, 1, 0, 0]]  # the rejected row ends in a pad token (0)
HAND_MASK = [[False, True, True, True], [False, True, True, False]]  # prompt = 1 token
HAND_HYPER = dict(alpha_tilde=0.7, alpha_0=0.3, gamma=0.9, beta=0.25)


def _lse(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def hand_expected(variant: str, length_norm) -> dict[str, float]:
    at, a0, g, beta = (HAND_HYPER[k] for k in ("alpha_tilde", "alpha_0", "gamma", "beta"))
    # V(s_t) = alpha_tilde * LSE((Q + alpha_0 L) / alpha_tilde) - alpha_0 * LSE(L), per row c/r, position t
    V = [[at * _lse([(q + a0 * l) / at for q, l in zip(HAND_Q[b][t], HAND_L[b][t])]) - a0 * _lse(HAND_L[b][t])
          for t in range(4)] for b in range(2)]
    Qc, Qr, Vc, Vr = HAND_Q[0], HAND_Q[1], V[0], V[1]
    if variant == "bellman":
        # chosen, mask F T T T, ids 2 0 1 1: actions t=0,1,2 scored (mask[t+1]); V(s_{t+1}) counts
        # while mask[t+2]; r_2 bootstraps past the last column: 0.
        r_c = [Qc[0][0] - g * Vc[1], Qc[1][1] - g * Vc[2], Qc[2][1]]
        # rejected, mask F T T F, ids 2 1 0 0: t=0,1 scored; r_1's next state is padding: 0.
        r_r = [Qr[0][1] - g * Vr[1], Qr[1][0]]
    elif variant == "advantage":
        # bellman's scored actions (t=0,1,2 chosen; t=0,1 rejected), each with its own state's value.
        r_c = [Qc[0][0] - g * Vc[0], Qc[1][1] - g * Vc[1], Qc[2][1] - g * Vc[2]]
        r_r = [Qr[0][1] - g * Vr[0], Qr[1][0] - g * Vr[1]]
    else:
        # official: action t scored iff mask[t] (t < T-1), r_t = Q[a_t] - gamma V(s_t) (same state).
        # chosen: t=1 (a=x2=1), t=2 (a=x3=1); the first response token (t=0 action) never scored.
        r_c = [Qc[1][1] - g * Vc[1], Qc[2][1] - g * Vc[2]]
        # rejected: t=1 (a=x2=0), t=2 (a=x3=0, the pad token: scored, as in the authors' code).
        r_r = [Qr[1][0] - g * Vr[1], Qr[2][0] - g * Vr[2]]
    # response: each row's own number of scored actions; padded: T - 1 = 3 (True); none: 1 (False).
    norm_c, norm_r = {LengthNorm.RESPONSE: (len(r_c), len(r_r)), LengthNorm.PADDED: (3, 3),
                      LengthNorm.NONE: (1, 1)}[LengthNorm.parse(length_norm)]
    s_c, s_r = sum(r_c) / norm_c, sum(r_r) / norm_r
    pref = math.log1p(math.exp(s_r - s_c))  # softplus(S_rejected - S_chosen), mean over B = 1
    rs = r_c + r_r
    reg = beta * sum(r * r for r in rs) / len(rs)
    return dict(loss=pref + reg, pref_loss=pref, reg_loss=reg, chosen_scores=s_c, rejected_scores=s_r,
                accuracy=float(s_c > s_r))


@pytest.mark.parametrize("length_norm", ["response", "padded", "none", True, False])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_hand_computed_example(backend, device, dtype, variant, length_norm):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels accumulate in fp32: fp64 is checked on the C++ path and the reference")
    q = torch.tensor(HAND_Q, dtype=dtype, device=device)
    base = torch.tensor(HAND_L, dtype=dtype, device=device)
    ids = torch.tensor(HAND_IDS, device=device)
    mask = torch.tensor(HAND_MASK, device=device)
    out = qk.qadapter_loss(q, base, ids, mask, **HAND_HYPER, variant=variant, length_norm=length_norm,
                           backend=backend)
    expected = hand_expected(variant, length_norm)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for name, value in expected.items():
        got = getattr(out, name)
        assert_close(got.reshape(()), torch.tensor(value, dtype=torch.float64), **tol, what=name)
    # The variants give different numbers here: the example does tell them apart.
    for other in set(VARIANTS) - {variant}:
        assert abs(hand_expected(other, length_norm)["loss"] - expected["loss"]) > 1e-2


# --------------------------------------------------------------------------- gradcheck (C++ path, fp64)


def _gradcheck_batch(seed):
    # B = 2, T = 6, V = 5; row 1 has an empty mask, row 3 a single response token.
    return make_pair_batch(2, 6, 5, seed=seed, dtype=torch.float64, prompt_lens=[1, 2, 1, 2],
                           response_lens=[5, 0, 2, 1])


@pytest.mark.parametrize("output", DIFF_FIELDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_each_output(variant, output):
    batch = _gradcheck_batch(3)

    def f(q):
        out = qk.qadapter_loss(q, batch.base_logits, batch.input_ids, batch.loss_mask, alpha_tilde=0.8,
                               alpha_0=0.4, gamma=0.9, beta=0.3, variant=variant, backend="cpu")
        return getattr(out, output)

    assert torch.autograd.gradcheck(f, (leaf(batch.q_logits),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck_all_outputs(variant, length_norm):
    batch = _gradcheck_batch(4)

    def f(q):
        out = qk.qadapter_loss(q, batch.base_logits, batch.input_ids, batch.loss_mask, variant=variant,
                               length_norm=length_norm, backend="cpu")
        return tuple(getattr(out, name) for name in DIFF_FIELDS)

    assert torch.autograd.gradcheck(f, (leaf(batch.q_logits),), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- length normalisation


def _ragged_pairs(n_pairs: int, prompt: int, max_response: int, vocab: int, seed: int):
    """Per sequence (chosen ones, then rejected): logits [L, V] x2, ids [L], mask [L], of its own length L."""
    gen = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(2 * n_pairs):
        length = prompt + int(torch.randint(1, max_response + 1, (1,), generator=gen))
        q = torch.randn(length, vocab, generator=gen) * 2
        base = torch.randn(length, vocab, generator=gen) * 2
        ids = torch.randint(0, vocab, (length,), generator=gen)
        mask = torch.arange(length) >= prompt
        sequences.append((q, base, ids, mask))
    return sequences


def _scores_in_batches(sequences, n_pairs: int, batch_size: int, backend: str, device: str, **keywords):
    """Chosen and rejected scores of every pair, evaluating ``batch_size`` pairs at a time, each batch
    right-padded to its own longest sequence (as an evaluation loop pads)."""
    chosen, rejected = [], []
    for start in range(0, n_pairs, batch_size):
        pairs = list(range(start, min(start + batch_size, n_pairs)))
        rows = [sequences[i] for i in pairs] + [sequences[n_pairs + i] for i in pairs]
        width = max(len(r[2]) for r in rows)
        pad = lambda t, fill: torch.cat([t, t.new_full((width - t.shape[0], *t.shape[1:]), fill)])  # noqa: E731
        q, base, ids, mask = (torch.stack([pad(r[k], fill) for r in rows]).to(device)
                              for k, fill in ((0, 0.0), (1, 0.0), (2, 0), (3, False)))
        out = qk.qadapter_loss(q, base, ids, mask, backend=backend, **keywords)
        chosen.append(out.chosen_scores.cpu())
        rejected.append(out.rejected_scores.cpu())
    return torch.cat(chosen), torch.cat(rejected)


@pytest.mark.parametrize("variant", ["bellman", "advantage"])
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_default_scores_do_not_depend_on_the_batch(backend, device, variant):
    """With the default normalisation, the same pairs get the same scores whether
    they are evaluated 1, 3 or 10 at a time (padded to different widths).

    The "official" variant is left out by design: as in the authors' code it scores the action
    taken at the last response position, which is the first pad token when a row is padded, so
    its scores depend on padding whatever the normalisation (test_hand_computed_example pins that).
    """
    n_pairs = 10
    sequences = _ragged_pairs(n_pairs, prompt=3, max_response=9, vocab=37, seed=14)
    one_by_one = _scores_in_batches(sequences, n_pairs, 1, backend, device, variant=variant)
    exact = backend == "cpu"  # the C++ pass sums each row in the same order whatever the width
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-6)
    for batch_size in (3, 10):
        got = _scores_in_batches(sequences, n_pairs, batch_size, backend, device, variant=variant)
        for name, a, b in zip(("chosen_scores", "rejected_scores"), got, one_by_one):
            assert_close(a, b, **tol, what=f"{name} at batch size {batch_size}")
    # The authors' rule divides by the padded width: the same pairs score differently per batch
    # size (what the default fixes, and what shows this test can fail).
    padded_1 = _scores_in_batches(sequences, n_pairs, 1, backend, device, variant=variant, length_norm="padded")
    padded_10 = _scores_in_batches(sequences, n_pairs, 10, backend, device, variant=variant, length_norm="padded")
    assert (padded_1[0] - padded_10[0]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_padded_norm_is_the_authors_t_minus_1_rule(backend, device, variant, seed):
    """length_norm="padded" (and True, its former spelling) divides each score by T - 1, bit for bit
    as before on the C++ path: the sum of the op's rewards, in double, times 1 / (T - 1)."""
    batch = make_pair_batch(3, 9, 41, seed=seed).to(device)
    args = (batch.q_logits, batch.base_logits, batch.input_ids, batch.loss_mask)
    padded = qk.qadapter_loss(*args, variant=variant, length_norm="padded", backend=backend)
    as_bool = qk.qadapter_loss(*args, variant=variant, length_norm=True, backend=backend)
    unnormalised = qk.qadapter_loss(*args, variant=variant, length_norm="none", backend=backend)
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(padded, name), getattr(as_bool, name)), name
    T = batch.input_ids.shape[1]
    for got, total in ((padded.chosen_scores, unnormalised.chosen_scores),
                       (padded.rejected_scores, unnormalised.rejected_scores)):
        expected = (total.double() * (1.0 / (T - 1))).float()
        if backend == "cpu":
            assert torch.equal(got, expected)
        else:
            assert_close(got, expected, rtol=1e-6, atol=1e-7, what="score = sum / (T - 1)")
    if variant == "official":  # the authors' own formula uses this rule
        authors = reference.authors_qadapter_loss(*(t.cpu() for t in args))
        assert_close(padded.loss.cpu(), authors, rtol=1e-5, atol=1e-6, what="the authors' loss")


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_params_object_and_keywords_agree(backend, device):
    """A QAdapterParams, keyword overrides on top of it, and plain keywords are one call."""
    batch = make_pair_batch(2, 7, 23, seed=3).to(device)
    args = (batch.q_logits, batch.base_logits, batch.input_ids, batch.loss_mask)
    params = qk.QAdapterParams(alpha_tilde=0.7, alpha_0=0.4, gamma=0.9, beta=0.3, variant="official",
                               length_norm="none")
    by_object = qk.qadapter_loss(*args, params, backend=backend)
    by_keywords = qk.qadapter_loss(*args, alpha_tilde=0.7, alpha_0=0.4, gamma=0.9, beta=0.3, variant="official",
                                   length_norm=False, backend=backend)
    overridden = qk.qadapter_loss(*args, qk.QAdapterParams(alpha_0=9.0, length_norm="none"), alpha_tilde=0.7,
                                  alpha_0=0.4, gamma=0.9, beta=0.3, variant="official", backend=backend)
    for name in LOSS_FIELDS:
        assert torch.equal(getattr(by_object, name), getattr(by_keywords, name)), name
        assert torch.equal(getattr(by_object, name), getattr(overridden, name)), name
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['temperature'\]"):
        qk.qadapter_loss(*args, temperature=0.5, backend=backend)
    with pytest.raises(TypeError, match="params must be a QAdapterParams"):
        qk.qadapter_loss(*args, qk.SamplingParams(), backend=backend)


# --------------------------------------------------------------------------- value checks off


def _checks_off(monkeypatch):
    """What torch.compile and CUDA-graph capture see: the value checks (host syncs) are skipped."""
    import qadapter_kernels.api.loss as loss_api

    monkeypatch.setattr(loss_api, "value_checks_enabled", lambda device: False)


# The C++ kernel's empty-mask behaviour is the HARNESS helper's change (tests/test_direct_op_calls.py).
@pytest.mark.parametrize("backend, device", [p for p in ALL_BACKENDS if p.values[0] != "cpu"])
def test_empty_mask_with_checks_off_gives_nan(backend, device, monkeypatch):
    """With no scored token and value checks off, every backend returns a NaN
    regulariser (0 / 0) instead of raising inside a kernel."""
    _checks_off(monkeypatch)
    batch = make_pair_batch(2, 6, 13, seed=2).to(device)
    out = qk.qadapter_loss(batch.q_logits, batch.base_logits, batch.input_ids,
                           torch.zeros_like(batch.loss_mask), backend=backend)
    assert torch.isnan(out.reg_loss) and torch.isnan(out.loss)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_out_of_range_id_with_checks_off_gives_nan(backend, device, monkeypatch):
    """An id outside [0, V) at a scored position gives q_taken = NaN, so a NaN
    loss, on every backend, with value checks off (nothing reads out of bounds, nothing raises)."""
    _checks_off(monkeypatch)
    batch = make_pair_batch(2, 6, 13, seed=2).to(device)
    ids = batch.input_ids.clone()
    ids[0, 3] = 13
    mask = batch.loss_mask.clone()
    mask[0, 2:4] = True
    out = qk.qadapter_loss(batch.q_logits, batch.base_logits, ids, mask, backend=backend, variant="official")
    assert torch.isnan(out.loss)


# --------------------------------------------------------------------------- torch.compile

def _graph_recorder(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _loss_fn(variant, backend):
    def f(q, base, ids, mask):
        return qk.qadapter_loss(q, base, ids, mask, alpha_tilde=0.9, alpha_0=0.2, gamma=0.95, beta=0.3,
                                variant=variant, backend=backend).loss

    return f


@pytest.mark.parametrize("backend", [None, "cpu"], ids=["default", "cpu"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_fullgraph_loss_cpu(variant, backend, seed):
    """torch.compile(fullgraph=True) through qk.qadapter_loss(...).loss and its backward
    (inductor), equal to eager; and the captured graph calls the fused ops."""
    torch._dynamo.reset()
    batch = make_pair_batch(2, 12, 300, seed=seed)
    f = _loss_fn(variant, backend)
    compiled = torch.compile(f, fullgraph=True)
    q_c, q_e = leaf(batch.q_logits.clone()), leaf(batch.q_logits.clone())
    args = (batch.base_logits, batch.input_ids, batch.loss_mask)
    loss_c = compiled(q_c, *args)
    loss_e = f(q_e, *args)
    loss_c.backward()
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(q_c.grad, q_e.grad, rtol=1e-6, atol=1e-9, what="compiled dQ")

    graphs = []
    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=_graph_recorder(graphs))(leaf(batch.q_logits.clone()), *args)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("qadapter.residual_q_values" in t for t in targets), targets
    assert any("qadapter.pair_loss" in t for t in targets), targets


def test_compile_fullgraph_every_output_cpu(seed):
    """All outputs of the compiled loss (returned as a tuple), with gradients from each."""
    torch._dynamo.reset()
    batch = make_pair_batch(3, 10, 200, seed=seed)

    def f(q, base, ids, mask):
        out = qk.qadapter_loss(q, base, ids, mask, variant="official")
        return tuple(getattr(out, name) for name in LOSS_FIELDS)

    q_c, q_e = leaf(batch.q_logits.clone()), leaf(batch.q_logits.clone())
    args = (batch.base_logits, batch.input_ids, batch.loss_mask)
    outs_c = torch.compile(f, fullgraph=True)(q_c, *args)
    outs_e = f(q_e, *args)
    for name, c, e in zip(LOSS_FIELDS, outs_c, outs_e):
        assert_close(c, e, rtol=1e-6, atol=1e-6, what=name)
    weights = [random_weights(o.shape, k).float() for k, o in enumerate(outs_e[:5])]
    sum((o * w).sum() for o, w in zip(outs_c[:5], weights)).backward()
    sum((o * w).sum() for o, w in zip(outs_e[:5], weights)).backward()
    assert_close(q_c.grad, q_e.grad, rtol=1e-6, atol=1e-9, what="compiled dQ")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_compile_fullgraph_loss_cuda(variant, seed):
    torch._dynamo.reset()
    batch = make_pair_batch(2, 64, 32000, seed=seed).to("cuda")
    f = _loss_fn(variant, None)
    q_c, q_e = leaf(batch.q_logits.clone()), leaf(batch.q_logits.clone())
    args = (batch.base_logits, batch.input_ids, batch.loss_mask)
    loss_c = torch.compile(f, fullgraph=True)(q_c, *args)
    loss_e = f(q_e, *args)
    loss_c.backward()
    loss_e.backward()
    assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(q_c.grad, q_e.grad, rtol=1e-6, atol=1e-9, what="compiled dQ")


# --------------------------------------------------------------------------- bad input

BAD_CASES = {
    **COMMON_CASES,
    "q_logits 2-D": (lambda a: a.update({k: a[k][0] for k in ("q_logits", "base_logits")}),
                     ValueError, r"q_logits must be \[2B, T, V\]"),
    "odd number of rows": (
        lambda a: a.update({k: a[k][:3] for k in ("q_logits", "base_logits", "input_ids", "loss_mask")}),
        ValueError, r"q_logits must hold 2B rows"),
    "no rows": (
        lambda a: a.update({k: a[k][:0] for k in ("q_logits", "base_logits", "input_ids", "loss_mask")}),
        ValueError, r"q_logits must hold 2B rows"),
    "T = 1": (
        lambda a: a.update({k: a[k][:, :1] for k in ("q_logits", "base_logits", "input_ids", "loss_mask")}),
        ValueError, r"T >= 2"),
    "V = 0": (lambda a: a.update({k: a[k][..., :0] for k in ("q_logits", "base_logits")}),
              ValueError, r"q_logits must be \[\.\.\., V\] with V >= 1"),
    "input_ids shape": (set_arg("input_ids", lambda a: a["input_ids"][:, 1:]), ValueError, r"input_ids must have shape"),
    "loss_mask shape": (set_arg("loss_mask", lambda a: a["loss_mask"][:-2]), ValueError, r"loss_mask must have shape"),
    "input_ids float": (set_arg("input_ids", lambda a: a["input_ids"].float()), TypeError,
                        r"input_ids must be an integer"),
    "loss_mask float": (set_arg("loss_mask", lambda a: a["loss_mask"].float()), TypeError, r"loss_mask must be a bool"),
    "input_ids negative": (poke_arg("input_ids", (3, 4), -100), ValueError, r"input_ids must be token ids in \[0, 13\)"),
    "input_ids = V": (poke_arg("input_ids", (0, 2), BAD_V), ValueError, r"input_ids must be token ids in \[0, 13\)"),
    "input_ids on another device": (on_meta("input_ids"), ValueError, r"input_ids is on meta"),
    "loss_mask on another device": (on_meta("loss_mask"), ValueError, r"loss_mask is on meta"),
    "bad variant": (set_arg("variant", lambda a: "Bellman"), ValueError, r"variant must be one of"),
    "gamma < 0": (set_arg("gamma", lambda a: -0.1), ValueError, r"gamma must be in \[0\.0, 1\.0\]"),
    "gamma > 1": (set_arg("gamma", lambda a: 1.01), ValueError, r"gamma must be in \[0\.0, 1\.0\]"),
    "beta < 0": (set_arg("beta", lambda a: -1e-3), ValueError, r"beta must be in \[0"),
    "beta = nan": (set_arg("beta", lambda a: float("nan")), ValueError, r"beta must be in"),
    "length_norm unknown": (set_arg("length_norm", lambda a: "tokens"), ValueError, r"length_norm must be one of"),
    "length_norm an int": (set_arg("length_norm", lambda a: 1), ValueError, r"length_norm must be one of"),
    "empty mask": (set_arg("loss_mask", lambda a: torch.zeros_like(a["loss_mask"])), ValueError,
                   r"loss_mask scores no token"),
    "-inf Q at a scored action": (
        # bellman scores the action at t = 1 of row 0 (its prompt is shorter than T - 2): x[0, 2]
        lambda a: poke_arg("q_logits", (0, 1, int(a["input_ids"][0, 2])), float("-inf"))(a),
        ValueError, r"the loss is not finite: an action at a scored position has a -inf q_logit"),
}


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_loss_valid_call(backend, device):
    out = call_with_backend(qk.qadapter_loss, loss_args(device), backend)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_loss_rejects(backend, device, case):
    mutate, exc, pattern = BAD_CASES[case]
    args = loss_args(device)
    if case == "-inf Q at a scored action":
        assert args["loss_mask"][0, 2]  # so bellman (the default) scores the action at t = 1
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call_with_backend(qk.qadapter_loss, args, backend)


MASK_CASES = [
    pytest.param([], "bellman", False, id="none-bellman"),
    pytest.param([], "official", False, id="none-official"),
    pytest.param([0], "bellman", False, id="first-col-bellman"),
    pytest.param([0], "official", True, id="first-col-official"),
    pytest.param([BAD_T - 1], "bellman", True, id="last-col-bellman"),
    pytest.param([BAD_T - 1], "official", False, id="last-col-official"),
    pytest.param([0, BAD_T - 1], "bellman", True, id="first-and-last-bellman"),
    pytest.param([0, BAD_T - 1], "official", True, id="first-and-last-official"),
]


@pytest.mark.parametrize("columns, variant, scores_something", MASK_CASES)
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_batch_with_no_scored_token(backend, device, columns, variant, scores_something):
    args = loss_args(device)
    mask = torch.zeros_like(args["loss_mask"])
    mask[:, columns] = True
    args["loss_mask"] = mask
    if not scores_something:
        with pytest.raises(ValueError, match=r"loss_mask scores no token in the whole batch"):
            call_with_backend(qk.qadapter_loss, {**args, "variant": variant}, backend)
        return
    out = call_with_backend(qk.qadapter_loss, {**args, "variant": variant}, backend)
    ref = reference.qadapter_loss(**{k: v.cpu() for k, v in args.items()}, variant=variant)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5, what="loss")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["base_logits", "input_ids", "loss_mask"])
def test_loss_tensors_on_cpu_and_cuda(moved):
    args = loss_args("cuda")
    args[moved] = args[moved].cpu()
    with pytest.raises(ValueError, match=rf"{moved} is on cpu but q_logits is on cuda"):
        qk.qadapter_loss(**args)


@requires_cuda
@pytest.mark.cuda
def test_cpu_backend_refuses_cuda_tensors():
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors, got tensors on cuda"):
        qk.qadapter_loss(**loss_args("cuda"), backend="cpu")

