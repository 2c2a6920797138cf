"""The torch.ops.qadapter ops as the dispatcher sees them: opcheck (schema, fake kernels,
autograd registration, AOT dispatch), the ops' own outputs against the reference, and
torch.compile(fullgraph=True) through the public loss.
"""
import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels import reference

from helpers import (
    GRAD_TOL,
    LOSS_FIELDS,
    assert_close,
    leaf,
    make_pair_batch,
    make_rows,
    random_weights,
    requires_cuda,
)

ops = torch.ops.qadapter

# The ops are dispatcher ops: C++ on CPU tensors, Triton (registered for the CUDA key) on CUDA.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda]),
]


def _rows(device, dtype=torch.float32, n=6, vocab=50, seed=0, strided=False):
    q, base, actions = make_rows(n, vocab + (5 if strided else 0), seed=seed)
    if strided:  # row stride != V
        q, base, actions = q[:, :vocab], base[:, :vocab], actions % vocab
    return q.to(device, dtype), base.to(device, dtype), actions.to(device)


def _pair(device, dtype=torch.float32, B=2, T=7, seed=0):
    batch = make_pair_batch(B, T, 11, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(2 * B, T, generator=gen).to(device, dtype)
    q_taken = torch.randn(2 * B, T, generator=gen).to(device, dtype)
    return values, q_taken, batch.loss_mask.to(device)


# --------------------------------------------------------------------------- opcheck

RQV_CASES = [
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float64, False, id="fp64"),
    pytest.param(torch.float32, True, id="fp32-row-stride"),
]


@pytest.mark.parametrize("dtype, strided", RQV_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_residual_q_values(device, dtype, strided):
    q, base, actions = _rows(device, dtype, strided=strided)
    torch.library.opcheck(ops.residual_q_values, (leaf(q), base, actions, 0.9, 0.1))
    torch.library.opcheck(ops.residual_q_values, (q, base, actions, 1.0, 0.0))  # no grad, alpha_0 = 0


@pytest.mark.parametrize("dtype, strided", RQV_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_residual_q_values_backward(device, dtype, strided):
    q, base, actions = _rows(device, dtype, strided=strided)
    _, _, lse_y = ops.residual_q_values(q, base, actions, 0.9, 0.1)
    acc = lse_y.dtype
    grad_values = random_weights(6, 1, zero_frac=0.3).to(device, acc)
    grad_q_taken = random_weights(6, 2, zero_frac=0.3).to(device, acc)
    torch.library.opcheck(ops.residual_q_values_backward,
                          (grad_values, grad_q_taken, q, base, actions, lse_y, 0.9, 0.1))


@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", ["bellman", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pair_loss(device, dtype, variant, length_norm):
    values, q_taken, mask = _pair(device, dtype)
    torch.library.opcheck(ops.pair_loss, (leaf(values), leaf(q_taken), mask, 0.9, 0.2, variant, length_norm))
    torch.library.opcheck(ops.pair_loss, (values, q_taken, mask, 1.0, 0.0, variant, length_norm))


@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", ["bellman", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_pair_loss_backward(device, dtype, variant, length_norm):
    values, q_taken, mask = _pair(device, dtype)
    _, _, _, scores, _, rewards, num_scored = ops.pair_loss(values, q_taken, mask, 0.9, 0.2, variant, length_norm)
    g = lambda *shape, seed: random_weights(shape, seed).to(device, dtype)  # noqa: E731
    args = (g(seed=1), g(seed=2), g(seed=3), g(4, seed=4), g(4, 7, seed=5), scores, rewards, num_scored, mask,
            0.9, 0.2, variant, length_norm)
    torch.library.opcheck(ops.pair_loss_backward, args)


# --------------------------------------------------------------------------- the ops' own outputs


@pytest.mark.parametrize("device", DEVICES)
def test_residual_q_values_op_outputs(device):
    """lse_y (kept for the backward) is LSE((Q + alpha_0 L) / alpha_tilde); the backward op is
    g_q * onehot(a) + g_V * softmax(y), computed here from its definition."""
    at, a0 = 0.8, 0.3
    q, base, actions = _rows(device, n=9, vocab=1030)
    values, q_taken, lse_y = ops.residual_q_values(q, base, actions, at, a0)
    ref_values, ref_q_taken = reference.residual_q_values(q, base, actions, alpha_tilde=at, alpha_0=a0)
    y = (q + a0 * base) / at
    assert_close(values, ref_values, rtol=1e-5, atol=1e-5, what="values")
    assert_close(q_taken, ref_q_taken, rtol=0, atol=0, what="q_taken")
    assert_close(lse_y, torch.logsumexp(y, -1), rtol=1e-5, atol=1e-5, what="lse_y")
    g_v = random_weights(9, 1, zero_frac=0.3).float().to(device)
    g_q = random_weights(9, 2, zero_frac=0.3).float().to(device)
    grad = ops.residual_q_values_backward(g_v, g_q, q, base, actions, lse_y, at, a0)
    onehot = torch.nn.functional.one_hot(actions, 1030).float()
    expected = g_q[:, None] * onehot + g_v[:, None] * torch.softmax(y, -1)
    assert_close(grad, expected, **GRAD_TOL[torch.float32], what="backward op")
    dead = (g_v == 0) & (g_q == 0)
    assert dead.any() and torch.equal(grad[dead], torch.zeros_like(grad[dead]))


@pytest.mark.parametrize("variant", ["bellman", "official"])
@pytest.mark.parametrize("device", DEVICES)
def test_pair_loss_op_outputs(device, variant):
    """The op's extra outputs: rewards (0 where unscored) and num_scored, as the reference defines them."""
    values, q_taken, mask = _pair(device, B=3, T=10, seed=5)
    loss, pref, reg, scores, accuracy, rewards, num_scored = ops.pair_loss(
        values, q_taken, mask, 0.9, 0.2, variant, "padded")
    ref = reference.pair_loss(values, q_taken, mask, gamma=0.9, beta=0.2, variant=variant, length_norm="padded")
    tol = dict(rtol=1e-5, atol=1e-6)
    assert_close(rewards, reference.rewards(values, q_taken, mask, 0.9, variant), **tol, what="rewards")
    assert num_scored.item() == reference.scored_positions(mask, variant).sum().item()
    assert_close(scores, torch.cat([ref.chosen_scores, ref.rejected_scores]), **tol, what="scores")
    for name, got in (("loss", loss), ("pref_loss", pref), ("reg_loss", reg), ("accuracy", accuracy)):
        assert_close(got, getattr(ref, name), **tol, what=name)


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
@pytest.mark.parametrize("variant", ["bellman", "official"])
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
@pytest.mark.parametrize("variant", ["bellman", "official"])
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

