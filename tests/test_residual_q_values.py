"""qk.residual_q_values (the vocabulary pass) against reference.residual_q_values.

Every fused backend (C++ on CPU, Triton in the interpreter, Triton on CUDA) is checked on fresh
random inputs: values, q_taken, and the q_logits gradient of a random linear combination of both
outputs (with some rows' upstream gradient exactly zero, which the kernels short-cut).
"""
import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels import reference

from helpers import (
    ALL_BACKENDS,
    BAD_V,
    COMMON_CASES,
    FUSED,
    GRAD_TOL,
    OP_DEVICES,
    VALUE_TOL,
    assert_close,
    call_with_backend,
    interpreted,
    leaf,
    make_rows,
    on_meta,
    poke_arg,
    random_weights,
    rqv_args,
    set_arg,
)

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]

# case -> ((leading dims, V) for C++ / CUDA, (leading dims, V) for the interpreter)
CASES = {
    "realistic": (((64,), 32000), ((6,), 300)),
    "V=1": (((5,), 1), ((5,), 1)),
    "V=4097": (((9,), 4097), ((2,), 4097)),  # one past the Triton block (4096); C++ tiles 1024
    "V=1000": (((17,), 1000), ((3,), 1000)),
    "V=7": (((13,), 7), ((13,), 7)),
    "N=1": (((1,), 32000), ((1,), 300)),
    "no-lead-dims": (((), 50), ((), 50)),  # q_logits is 1-D [V]: values are 0-dim
    "lead=[2,3]": (((2, 3), 2053), ((2, 3), 129)),
    "N=0": (((0,), 33), ((0,), 33)),
}


def shape_for(case: str, backend: str, device: str):
    fast, interp = CASES[case]
    return interp if interpreted(backend, device) else fast


def compare_with_reference(q, base, actions, backend, device, *, alpha_tilde=1.0, alpha_0=0.01,
                           value_tol=VALUE_TOL, grad_tol=None, seed=0):
    """Runs both, checks values, q_taken and dQ of sum(w1 * values + w2 * q_taken); returns dQ."""
    dtype = q.dtype
    q_k = leaf(q.to(device))  # a no-op for views already on the device: their strides stay
    base_k, actions_k = base.to(device), actions.to(device)
    q, base, actions = q.cpu(), base.cpu(), actions.cpu()
    values, q_taken = qk.residual_q_values(q_k, base_k, actions_k, alpha_tilde=alpha_tilde, alpha_0=alpha_0, backend=backend)

    # Reference on the very same (low-precision) inputs, upcast: the fp32 ground truth.
    q_r = leaf(q, torch.float64 if dtype == torch.float64 else torch.float32)
    ref_values, ref_q_taken = reference.residual_q_values(q_r, base, actions, alpha_tilde=alpha_tilde, alpha_0=alpha_0)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert values.dtype == acc and q_taken.dtype == acc
    assert values.shape == actions.shape and q_taken.shape == actions.shape
    assert values.device == q_k.device
    assert_close(values, ref_values, **value_tol, what="values")
    # q_taken is a gather: exact.
    assert_close(q_taken, ref_q_taken, rtol=0, atol=0, what="q_taken")

    w_v = random_weights(actions.shape, seed, zero_frac=0.3)
    w_q = random_weights(actions.shape, seed + 1, zero_frac=0.3)
    ((values * w_v.to(device, acc)).sum() + (q_taken * w_q.to(device, acc)).sum()).backward()
    ((ref_values * w_v.to(acc)).sum() + (ref_q_taken * w_q.to(acc)).sum()).backward()
    assert q_k.grad.dtype == dtype and q_k.grad.shape == q.shape
    if grad_tol is None:
        # softmax(y) inherits the absolute rounding of y = (Q + alpha_0 L) / alpha_tilde, which
        # is ~eps * |y| in fp32 however it is computed: scale the relative tolerance with |y|.
        y = (q_r.detach() + alpha_0 * base.to(q_r.dtype)) / alpha_tilde
        y_max = y[torch.isfinite(y)].abs().max().item() if y.numel() else 0.0
        grad_tol = dict(GRAD_TOL[dtype])
        grad_tol["rtol"] = max(grad_tol["rtol"], 8 * torch.finfo(acc).eps * y_max)
    assert_close(q_k.grad, q_r.grad, **grad_tol, what="dQ")
    return q_k.grad


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", FUSED)
def test_matches_reference(backend, device, dtype, case, seed):
    lead, vocab = shape_for(case, backend, device)
    q, base, actions = make_rows(0, vocab, lead=lead, seed=seed, dtype=dtype)
    compare_with_reference(q, base, actions, backend, device, seed=seed)


@pytest.mark.parametrize("alpha_tilde, alpha_0", [(0.7, 0.5), (2.0, 0.0), (1.0, 3.0), (0.05, 0.01)])
@pytest.mark.parametrize("backend, device", FUSED)
def test_hyperparameters(backend, device, alpha_tilde, alpha_0, seed):
    n, vocab = (4, 700) if interpreted(backend, device) else (24, 5003)
    q, base, actions = make_rows(n, vocab, seed=seed)
    compare_with_reference(q, base, actions, backend, device, alpha_tilde=alpha_tilde, alpha_0=alpha_0, seed=seed)


@pytest.mark.parametrize("where", ["q", "base", "both", "base-any"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("backend, device", FUSED)
def test_banned_tokens(backend, device, dtype, where, seed):
    """-inf logits (banned tokens; in q never the taken one): finite values, zero softmax
    gradient there (the taken action still gets its g_q)."""
    n, vocab = (5, 1100) if interpreted(backend, device) else (32, 32000)
    q, base, actions = make_rows(n, vocab, seed=seed, dtype=dtype, neg_inf=where)
    grad = compare_with_reference(q, base, actions, backend, device, seed=seed)
    banned = torch.isinf(q) | torch.isinf(base)
    banned.scatter_(-1, actions.unsqueeze(-1), False)
    assert banned.any()
    assert (grad.cpu()[banned] == 0).all()
    if where == "base-any":
        assert torch.isinf(base.gather(-1, actions.unsqueeze(-1))).any()


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("backend, device", FUSED)
def test_large_magnitudes(backend, device, dtype, seed):
    """+-1e4 offsets per row: the online logsumexp must rescale, not overflow.

    At 1e4 one fp32 ulp is ~1e-3, so y = (Q + alpha_0 L) / alpha_tilde itself carries ~1e-3 of
    rounding that depends on the order of operations: softmax entries then agree to ~1e-3
    relative (compare_with_reference scales the gradient tolerance with |y|), values to ~1e-3
    absolute (1e-7 relative)."""
    offset = 1e4
    n, vocab = (4, 600) if interpreted(backend, device) else (16, 32000)
    q, base, actions = make_rows(n, vocab, seed=seed, dtype=dtype, offset=offset)
    eps = torch.finfo(torch.float32).eps
    compare_with_reference(q, base, actions, backend, device, seed=seed,
                           value_tol=dict(rtol=1e-6, atol=16 * eps * offset))


def _rows_whose_max_moves(vocab: int, seed: int, dtype):
    """Rows whose running maximum moves along the vocabulary in every way the tiled passes handle
    differently: a jump far above everything before it (a tile sum beyond e^64: two passes), a
    small jump, a masked (-inf or finfo.min) start, a steady climb, a 1e4 spike in one stream."""
    q, base, actions = make_rows(7, vocab, seed=seed)
    ramp = torch.linspace(-100.0, 100.0, vocab)
    q[0, 5000] += 200.0
    base[0, 5001] += 200.0
    q[1, 3000] += 30.0
    q[2, :2100] = base[2, :2100] = float("-inf")
    q[3] += ramp
    base[3] -= ramp
    q[4, :2100] = base[4, :2100] = torch.finfo(torch.float32).min
    base[5, 8000] = 1e4
    q[6] -= ramp
    base[6, 7000] += 100.0
    actions[[2, 4]] = torch.randint(2100, vocab, (2,), generator=torch.Generator().manual_seed(seed))
    return q.to(dtype), base.to(dtype), actions


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("backend, device", FUSED)
def test_maximum_moving_along_the_row(backend, device, dtype, seed):
    """The C++ pass takes a tile's exps against the running reference point in one pass, without
    the tile's max, and folds again in two passes when the tile's sum shows an entry far above it;
    the Triton pass rescales per block. Both must match the reference whichever way the max moves."""
    vocab = 9000  # 9 C++ tiles, 3 Triton blocks
    q, base, actions = _rows_whose_max_moves(vocab, seed, dtype)
    eps = torch.finfo(torch.float32).eps
    compare_with_reference(q, base, actions, backend, device, seed=seed, alpha_0=0.5,
                           value_tol=dict(rtol=1e-6, atol=16 * eps * 1e4))


@pytest.mark.parametrize("stream", ["q", "base"])
def test_nan_in_a_later_tile_gives_nan_value_through_the_op(stream):
    """The public API rejects NaN logits; the op called directly (no value checks) must still not
    lose one: a NaN past the first tile, where the C++ pass folds in one pass without a max,
    reaches that row's value, and only that row's."""
    q, base, actions = make_rows(3, 9000, seed=0)
    (q if stream == "q" else base)[1, 6000] = float("nan")
    values, _, lse_y = torch.ops.qadapter.residual_q_values(q, base, actions, 1.0, 0.5)
    assert torch.isnan(values[1]) and torch.isnan(lse_y[1]) and torch.isfinite(values[[0, 2]]).all()


def _strided(kind: str, n: int, vocab: int, seed: int, device: str):
    """Views with unusual strides, built on the target device (a copy there would be contiguous)."""
    wide = [t.to(device) for t in make_rows(n, vocab + 11, seed=seed)]
    q, base, actions = wide[0][:, :vocab], wide[1][:, :vocab], wide[2] % vocab
    if kind == "row-stride":  # a slice of a wider buffer: stride(0) = V + 11 != V
        assert q.stride() == (vocab + 11, 1)
    elif kind == "lead-slice":  # [2, n/2, V] view of that slice: reshape(-1, V) keeps the stride
        q, base, actions = q.unflatten(0, (2, n // 2)), base.unflatten(0, (2, n // 2)), actions.view(2, n // 2)
        assert q.stride() == (n // 2 * (vocab + 11), vocab + 11, 1)
    elif kind == "transposed":  # the vocabulary is not the unit-stride dimension
        q, base = q.t().contiguous().t(), base.t().contiguous().t()
        assert q.stride() == (1, n)
    return q, base, actions


@pytest.mark.parametrize("kind", ["row-stride", "lead-slice", "transposed"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_non_contiguous(backend, device, kind, seed):
    n, vocab = (4, 300) if interpreted(backend, device) else (32, 4099)
    q, base, actions = _strided(kind, n, vocab, seed, device)
    compare_with_reference(q, base, actions, backend, device, seed=seed)


@pytest.mark.parametrize("backend, device", FUSED)
def test_base_logits_get_no_gradient(backend, device, seed):
    n, vocab = (3, 200) if interpreted(backend, device) else (8, 3000)
    q, base, actions = make_rows(n, vocab, seed=seed)
    q_k, base_k = leaf(q.to(device)), leaf(base.to(device))
    values, q_taken = qk.residual_q_values(q_k, base_k, actions.to(device), backend=backend)
    (values.sum() + q_taken.sum()).backward()
    assert base_k.grad is None
    assert q_k.grad is not None and q_k.grad.abs().sum() > 0


@pytest.mark.parametrize("output", ["values", "q_taken"])
@pytest.mark.parametrize("backend, device", FUSED)
def test_gradient_of_one_output(backend, device, output, seed):
    """Only one output feeds the loss: the other's gradient arrives as None."""
    n, vocab = (3, 257) if interpreted(backend, device) else (8, 4097)
    q, base, actions = make_rows(n, vocab, seed=seed)
    q_k, q_r = leaf(q.to(device)), leaf(q)
    out_k = dict(zip(("values", "q_taken"), qk.residual_q_values(q_k, base.to(device), actions.to(device),
                                                                 alpha_tilde=0.8, alpha_0=0.2, backend=backend)))
    out_r = dict(zip(("values", "q_taken"), reference.residual_q_values(q_r, base, actions, alpha_tilde=0.8, alpha_0=0.2)))
    w = random_weights(actions.shape, seed).float()
    (out_k[output] * w.to(device)).sum().backward()
    (out_r[output] * w).sum().backward()
    assert_close(q_k.grad, q_r.grad, **GRAD_TOL[torch.float32], what=f"dQ from {output}")


@pytest.mark.parametrize("backend, device", FUSED)
def test_zero_upstream_gradient_gives_exact_zeros(backend, device, seed):
    """Rows whose values and q_taken both get zero gradient (prompt and pad positions) must get
    exactly zero dQ (the kernels skip them), while the other rows get the full gradient."""
    n, vocab = (6, 300) if interpreted(backend, device) else (16, 5000)
    q, base, actions = make_rows(n, vocab, seed=seed)
    q_k, q_r = leaf(q.to(device)), leaf(q)
    values, q_taken = qk.residual_q_values(q_k, base.to(device), actions.to(device), backend=backend)
    ref_values, ref_q_taken = reference.residual_q_values(q_r, base, actions)
    live = torch.zeros(n, dtype=torch.bool)
    live[::3] = True
    w_v = torch.where(live, random_weights(n, seed).float(), 0.0)
    w_q = torch.where(live, random_weights(n, seed + 1).float(), 0.0)
    w_q[0] = 0.0  # a live row with only a value gradient
    w_v[3] = 0.0  # and one with only a q_taken gradient
    ((values * w_v.to(device)).sum() + (q_taken * w_q.to(device)).sum()).backward()
    ((ref_values * w_v).sum() + (ref_q_taken * w_q).sum()).backward()
    grad = q_k.grad.cpu()
    assert torch.equal(grad[~live], torch.zeros_like(grad[~live]))
    assert (grad[live] != 0).any(dim=-1).all()
    assert_close(grad, q_r.grad, **GRAD_TOL[torch.float32], what="dQ")


@pytest.mark.parametrize("backend, device", FUSED)
def test_integer_action_dtypes(backend, device, seed):
    n, vocab = (4, 120) if interpreted(backend, device) else (12, 1000)
    q, base, actions = make_rows(n, vocab, seed=seed)
    expected = qk.residual_q_values(q.to(device), base.to(device), actions.to(device), backend=backend)
    for dtype in (torch.int32, torch.int16):
        got = qk.residual_q_values(q.to(device), base.to(device), actions.to(device, dtype), backend=backend)
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


@pytest.mark.parametrize(
    "alpha_tilde, alpha_0, neg_inf", [(1.0, 0.01, None), (0.6, 0.7, None), (1.0, 0.01, "both")]
)
@pytest.mark.parametrize("lead, vocab", [((3,), 5), ((2, 2), 1), ((), 9), ((1,), 1030)])
def test_gradcheck_cpu_float64(lead, vocab, alpha_tilde, alpha_0, neg_inf):
    """Finite differences through the public function on the C++ path (fp64 runs the same code)."""
    q, base, actions = make_rows(0, vocab, lead=lead, seed=7, dtype=torch.float64,
                                 neg_inf=neg_inf if vocab > 1 else None)
    q = leaf(q)

    def f(q_logits):
        return qk.residual_q_values(q_logits, base, actions, alpha_tilde=alpha_tilde, alpha_0=alpha_0, backend="cpu")

    assert torch.autograd.gradcheck(f, (q,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------- the dispatcher op: opcheck, outputs, torch.compile

OPS = torch.ops.qadapter


def op_rows(device, dtype=torch.float32, n=6, vocab=50, seed=0, strided=False):
    q, base, actions = make_rows(n, vocab + (5 if strided else 0), seed=seed)
    if strided:  # row stride != V
        q, base, actions = q[:, :vocab], base[:, :vocab], actions % vocab
    return q.to(device, dtype), base.to(device, dtype), actions.to(device)


OPCHECK_CASES = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.float32, True, id="fp32-row-stride"),
]


@pytest.mark.parametrize("dtype, strided", OPCHECK_CASES)
@pytest.mark.parametrize("device", OP_DEVICES)
def test_opcheck_residual_q_values(device, dtype, strided):
    q, base, actions = op_rows(device, dtype, strided=strided)
    torch.library.opcheck(OPS.residual_q_values, (leaf(q), base, actions, 0.9, 0.1))
    torch.library.opcheck(OPS.residual_q_values, (q, base, actions, 1.0, 0.0))  # no grad, alpha_0 = 0


@pytest.mark.parametrize("dtype, strided", OPCHECK_CASES)
@pytest.mark.parametrize("device", OP_DEVICES)
def test_opcheck_residual_q_values_backward(device, dtype, strided):
    q, base, actions = op_rows(device, dtype, strided=strided)
    _, _, lse_y = OPS.residual_q_values(q, base, actions, 0.9, 0.1)
    acc = lse_y.dtype
    grad_values = random_weights(6, 1, zero_frac=0.3).to(device, acc)
    grad_q_taken = random_weights(6, 2, zero_frac=0.3).to(device, acc)
    torch.library.opcheck(OPS.residual_q_values_backward,
                          (grad_values, grad_q_taken, q, base, actions, lse_y, 0.9, 0.1))


@pytest.mark.parametrize("device", OP_DEVICES)
def test_residual_q_values_op_outputs(device):
    """lse_y (kept for the backward) is LSE((Q + alpha_0 L) / alpha_tilde); the backward op is
    g_q * onehot(a) + g_V * softmax(y), computed here from its definition."""
    at, a0 = 0.8, 0.3
    q, base, actions = op_rows(device, n=9, vocab=1030)
    values, q_taken, lse_y = OPS.residual_q_values(q, base, actions, at, a0)
    ref_values, ref_q_taken = reference.residual_q_values(q, base, actions, alpha_tilde=at, alpha_0=a0)
    y = (q + a0 * base) / at
    assert_close(values, ref_values, rtol=1e-5, atol=1e-5, what="values")
    assert_close(q_taken, ref_q_taken, rtol=0, atol=0, what="q_taken")
    assert_close(lse_y, torch.logsumexp(y, -1), rtol=1e-5, atol=1e-5, what="lse_y")
    g_v = random_weights(9, 1, zero_frac=0.3).float().to(device)
    g_q = random_weights(9, 2, zero_frac=0.3).float().to(device)
    grad = OPS.residual_q_values_backward(g_v, g_q, q, base, actions, lse_y, at, a0)
    onehot = torch.nn.functional.one_hot(actions, 1030).float()
    expected = g_q[:, None] * onehot + g_v[:, None] * torch.softmax(y, -1)
    assert_close(grad, expected, **GRAD_TOL[torch.float32], what="backward op")
    dead = (g_v == 0) & (g_q == 0)
    assert dead.any() and torch.equal(grad[dead], torch.zeros_like(grad[dead]))


def test_compile_fullgraph_residual_q_values_cpu(seed):
    torch._dynamo.reset()
    q, base, actions = make_rows(0, 1000, lead=(2, 5), seed=seed)

    def f(q_logits):
        values, q_taken = qk.residual_q_values(q_logits, base, actions, alpha_tilde=0.7, alpha_0=0.05)
        return (values * 2 - q_taken).sum()

    q_c, q_e = leaf(q.clone()), leaf(q.clone())
    out_c = torch.compile(f, fullgraph=True)(q_c)
    out_e = f(q_e)
    out_c.backward()
    out_e.backward()
    assert_close(out_c, out_e, rtol=1e-6, atol=1e-6, what="compiled output")
    assert_close(q_c.grad, q_e.grad, rtol=1e-6, atol=1e-9, what="compiled dQ")


# --------------------------------------------------------------------------- bad input

BAD_CASES = {
    **COMMON_CASES,
    "V = 0": (lambda a: a.update({k: a[k][..., :0] for k in ("q_logits", "base_logits")}),
              ValueError, r"q_logits must be \[\.\.\., V\] with V >= 1"),
    "actions shape": (set_arg("actions", lambda a: a["actions"][:, :-1]), ValueError, r"actions must have shape"),
    "actions float": (set_arg("actions", lambda a: a["actions"].float()), TypeError, r"actions must be an integer"),
    "actions negative": (poke_arg("actions", (1, 2), -1), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions = V": (poke_arg("actions", (2, 3), BAD_V), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions huge": (poke_arg("actions", (0, 0), 2**40), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions on another device": (on_meta("actions"), ValueError, r"actions is on meta"),
}


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_residual_q_values_valid_call(backend, device):
    values, _ = call_with_backend(qk.residual_q_values, rqv_args(device), backend)
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_residual_q_values_rejects(backend, device, case):
    mutate, exc, pattern = BAD_CASES[case]
    args = rqv_args(device)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        call_with_backend(qk.residual_q_values, args, backend)


@pytest.mark.parametrize("backend, device", FUSED)
def test_neg_inf_q_at_taken_action_is_allowed_in_residual_q_values(backend, device):
    """Unlike the loss, the vocabulary pass accepts a -inf Q at the picked action: q_taken is -inf,
    the value finite (a banned action picked on purpose, e.g. to score a sampled sequence)."""
    args = rqv_args(device)
    q = args["q_logits"].clone()
    q[1, 2, int(args["actions"][1, 2])] = float("-inf")
    values, q_taken = qk.residual_q_values(q, args["base_logits"], args["actions"], backend=backend)
    assert q_taken[1, 2].item() == float("-inf") and torch.isfinite(values).all()



def test_large_dq_reuses_the_last_freed_block_without_stale_values(seed):
    """A freed dQ of 32 MiB or more is kept for the next one of the same size (a training loop
    asks for one per step): the next backward gets the same memory, already written, and every
    entry of it is new, prompt rows' exact zeros included. Another size gets other memory."""
    vocab = 32000
    n = -(-(32 << 20) // (vocab * 4))
    q, base, actions = make_rows(n, vocab, seed=seed)
    q_k = leaf(q)
    values, q_taken = qk.residual_q_values(q_k, base, actions, backend="cpu")
    (values.sum() + q_taken.sum()).backward()
    first_ptr = q_k.grad.data_ptr()
    q_k.grad = None  # frees the block: it is kept

    live = torch.zeros(n, dtype=torch.bool)
    live[::2] = True
    w = torch.where(live, random_weights(n, seed).float(), 0.0)
    q_r = leaf(q)
    (qk.residual_q_values(q_k, base, actions, backend="cpu")[0] * w).sum().backward()
    (reference.residual_q_values(q_r, base, actions)[0] * w).sum().backward()
    assert q_k.grad.data_ptr() == first_ptr
    assert (q_k.grad[~live] == 0).all()
    assert_close(q_k.grad, q_r.grad, **GRAD_TOL[torch.float32], what="dQ in a reused block")

    q_k.grad = None
    wider = [torch.cat([t, t[:1]]) for t in (q, base, actions)]
    wider_k, wider_r = leaf(wider[0]), leaf(wider[0])
    qk.residual_q_values(wider_k, *wider[1:], backend="cpu")[0].sum().backward()
    reference.residual_q_values(wider_r, *wider[1:])[0].sum().backward()
    assert_close(wider_k.grad, wider_r.grad, **GRAD_TOL[torch.float32], what="dQ of another size")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_dq_is_huge_page_aligned_and_exact(dtype, seed):
    """A dQ of 32 MiB or more comes from 2 MiB-aligned memory (transparent huge pages: no page
    fault per 4 KiB on its first write) and is an ordinary tensor: same values as the reference,
    accumulates over two backwards, resizes, and shows in the profiler's memory records."""
    from torch.profiler import ProfilerActivity, profile

    vocab = 32000
    n = -(-(32 << 20) // (vocab * torch.finfo(dtype).bits // 8))  # just past 32 MiB
    q, base, actions = make_rows(n, vocab, seed=seed, dtype=dtype)
    dq = compare_with_reference(q, base, actions, "cpu", "cpu", seed=seed)
    assert dq.data_ptr() % (2 << 20) == 0
    q_k = leaf(q)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(2):
            qk.residual_q_values(q_k, base, actions, backend="cpu")[0].sum().backward()
    allocated = [e.nbytes() for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.nbytes() >= dq.nbytes]
    assert allocated, "the profiler saw no dQ-sized allocation"
    once = q_k.grad.clone()
    qk.residual_q_values(q_k, base, actions, backend="cpu")[0].sum().backward()
    assert_close(q_k.grad, once * 1.5, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=0, what="accumulated dQ")
    q_k.grad.resize_(2 * n, vocab)  # storage that an allocator owns can grow
    assert q_k.grad.shape == (2 * n, vocab)
