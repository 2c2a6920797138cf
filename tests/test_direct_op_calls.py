"""Every op in the ``qadapter`` namespace, called directly through ``torch.ops.qadapter``.

The public functions check their arguments in Python, but the ops are reachable without them
(directly, or from a compiled graph with value checks off). So each kernel validates every
size, dtype and device it indexes: a call with one wrong argument raises an error that names
that argument (by its schema name), never reads past a tensor's end. The list of ops comes
from the dispatcher, so a new op without a valid call below fails ``test_every_op_has_a_case``.

Also the behaviours decided for calls with value checks off: an out-of-range action gives
``q_taken = NaN`` and no one-hot gradient term; a mask that scores nothing gives a NaN loss.
"""
import math
import re

import pytest
import torch

import qadapter_kernels  # noqa: F401  (registers the qadapter ops)

N, V, H, B, T = 4, 7, 5, 2, 5
ROWS = 2 * B


def registered_ops() -> list[str]:
    """Names of every op in the qadapter namespace, as the dispatcher knows them."""
    prefix = "qadapter::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def schema_arguments(op_name: str):
    return getattr(torch.ops.qadapter, op_name).default._schema.arguments


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _pair_mask() -> torch.Tensor:
    mask = torch.zeros(ROWS, T, dtype=torch.bool)
    mask[:, 2:] = True
    mask[1, -1] = False
    return mask


def _length_norm(op_name: str):
    """The schema's length_norm: a bool, or (once LengthNorm is a str enum) its default name."""
    arg = next(a for a in schema_arguments(op_name) if a.name == "length_norm")
    return "response" if str(arg.type) == "str" else True


def valid_arguments(op_name: str) -> dict[str, object]:
    """A valid call of each op, by schema argument name (small, odd sizes)."""
    actions = torch.tensor([0, 6, 3, 1])
    sampling = dict(uniforms=torch.tensor([0.1, 0.5, 0.9, 0.3]), temperature=torch.tensor([1.0, 0.0, 0.7, 2.0]),
                    top_k=torch.tensor([0, 1, 3, 10]), top_p=torch.tensor([1.0, 0.9, 0.5, 1.0]),
                    min_p=torch.tensor([0.0, 0.0, 0.1, 0.05]))
    hidden = dict(adapter_hidden=_randn(N, H, seed=1), base_hidden=_randn(N, H, seed=2), weight=_randn(V, H, seed=3),
                  bias=_randn(V, seed=4))
    logits = dict(q_logits=_randn(N, V, seed=5), base_logits=_randn(N, V, seed=6))
    alphas = dict(alpha_tilde=0.9, alpha_0=0.2)
    if op_name == "residual_q_values":
        return dict(**logits, actions=actions, **alphas)
    if op_name == "residual_q_values_backward":
        _, _, lse_y = torch.ops.qadapter.residual_q_values(*logits.values(), actions, **alphas)
        return dict(grad_values=_randn(N, seed=7), grad_q_taken=_randn(N, seed=8), **logits, actions=actions,
                    lse_y=lse_y, **alphas)
    pair_params = dict(gamma=0.9, beta=0.1, variant="bellman", length_norm=_length_norm("pair_loss"))
    if op_name == "pair_loss":
        return dict(values=_randn(ROWS, T, seed=9), q_taken=_randn(ROWS, T, seed=10), loss_mask=_pair_mask(),
                    **pair_params)
    if op_name == "pair_loss_backward":
        out = torch.ops.qadapter.pair_loss(*valid_arguments("pair_loss").values())
        return dict(grad_loss=torch.tensor(1.0), grad_pref_loss=torch.tensor(0.5), grad_reg_loss=torch.tensor(0.25),
                    grad_scores=_randn(ROWS, seed=11), grad_rewards=_randn(ROWS, T, seed=12), scores=out[3],
                    rewards=out[5], num_scored=out[6], loss_mask=_pair_mask(), **pair_params)
    tiles = dict(tile_rows=3, tile_vocab=4)
    if op_name == "fused_linear_residual_q_values":
        return dict(**hidden, actions=actions, **alphas, **tiles, with_expected=True)
    if op_name == "fused_linear_residual_q_values_backward":
        _, _, lse_y, expected = torch.ops.qadapter.fused_linear_residual_q_values(
            *valid_arguments("fused_linear_residual_q_values").values())
        return dict(grad_values=_randn(N, seed=13), grad_q_taken=_randn(N, seed=14), **hidden, actions=actions,
                    lse_y=lse_y, expected=expected, **alphas, **tiles, output_mask=[True, True, True])
    if op_name == "combined_logits":
        return dict(**logits, **alphas)
    if op_name == "combined_sample":
        return dict(**logits, **sampling, **alphas)
    if op_name == "combined_sample_from_hidden":
        return dict(**hidden, **sampling, **alphas, tile_vocab=3, two_stream=False)
    if op_name == "combined_log_probs_from_hidden":
        return dict(**hidden, tokens=actions, **alphas, **tiles)
    raise KeyError(f"no valid call of qadapter::{op_name}: add one to valid_arguments")


def call(op_name: str, arguments: dict[str, object]):
    """The op on `arguments` by schema name; a schema argument with a default may be left out."""
    schema = schema_arguments(op_name)
    names = [a.name for a in schema]
    required = {a.name for a in schema if not a.has_default_value()}
    assert required <= set(arguments) <= set(names), f"{op_name}: schema {names} vs case {sorted(arguments)}"
    return getattr(torch.ops.qadapter, op_name)(**arguments)


def _like(t: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """A tensor of `shape` with values as valid as t's: zeros for ids, True for masks, N(0, 1) otherwise."""
    dtype = dtype or t.dtype
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    return _randn(*shape, seed=99).to(dtype)


def wrong_versions(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One wrong version of t per way a size or dtype can be wrong."""
    shape = list(t.shape)
    out = []
    for d in range(len(shape)):
        for delta in (-1, 1):
            wrong = shape.copy()
            wrong[d] += delta
            out.append((f"dim {d} {delta:+d}", _like(t, wrong)))
    out.append(("extra leading dim", _like(t, [2] + shape)))
    out.append(("one dim fewer" if shape else "two elements", _like(t, shape[1:] if shape else [2])))
    if not shape:
        out.append(("no element", _like(t, [0])))
    wrong_dtype = torch.int32 if t.dtype.is_floating_point else torch.float32
    out.append((f"dtype {wrong_dtype}", _like(t, shape, wrong_dtype)))
    return out


def bad_calls():
    for op_name in registered_ops():
        arguments = valid_arguments(op_name)
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                for what, wrong in wrong_versions(value):
                    yield pytest.param(op_name, name, wrong, id=f"{op_name}-{name}-{what}")
            elif name in ("tile_rows", "tile_vocab"):
                for wrong in (0, -3):
                    yield pytest.param(op_name, name, wrong, id=f"{op_name}-{name}={wrong}")
            elif isinstance(value, str):  # variant (and length_norm once it is a str enum)
                yield pytest.param(op_name, name, "nonsense", id=f"{op_name}-{name}=nonsense")


def test_every_op_has_a_case():
    ops = registered_ops()
    assert len(ops) >= 9, ops
    for op_name in ops:
        valid_arguments(op_name)  # raises KeyError for an op without a case


@pytest.mark.parametrize("op_name", registered_ops())
def test_valid_call_succeeds(op_name):
    out = call(op_name, valid_arguments(op_name))
    for t in out if isinstance(out, tuple) else (out,):
        if t.is_floating_point() and t.numel():
            assert torch.isfinite(t).all(), f"{op_name} gave non-finite output on a valid call"


def _spread(t: torch.Tensor) -> torch.Tensor:
    """The same values at every other element of a bigger buffer (last stride 2)."""
    if t.dim() == 0:
        return t
    spread = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    return spread.copy_(t)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the dimensions' strides reversed (a transposed buffer)."""
    if t.dim() < 2:
        return t
    return t.permute(*reversed(range(t.dim()))).contiguous().permute(*reversed(range(t.dim())))


@pytest.mark.parametrize("layout", [_spread, _column_major], ids=["spread", "column-major"])
@pytest.mark.parametrize("op_name", registered_ops())
def test_non_contiguous_arguments_give_the_same_result(op_name, layout):
    arguments = valid_arguments(op_name)
    expected = call(op_name, arguments)
    strided = {n: layout(v) if isinstance(v, torch.Tensor) else v for n, v in arguments.items()}
    actual = call(op_name, strided)
    for e, a in zip(expected if isinstance(expected, tuple) else (expected,),
                    actual if isinstance(actual, tuple) else (actual,)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op_name, name, wrong", list(bad_calls()))
def test_one_wrong_argument_raises_naming_it(op_name, name, wrong):
    arguments = valid_arguments(op_name)
    arguments[name] = wrong
    with pytest.raises((RuntimeError, ValueError, TypeError), match=rf"\b{re.escape(name)}\b"):
        call(op_name, arguments)


@pytest.mark.parametrize("op_name", ["residual_q_values", "fused_linear_residual_q_values"])
def test_out_of_range_action_gives_nan_and_no_one_hot_gradient(op_name):
    arguments = valid_arguments(op_name)
    arguments["actions"] = torch.tensor([0, V, -1, 1])
    out = call(op_name, arguments)
    q_taken = out[1]
    assert torch.isnan(q_taken[1:3]).all() and torch.isfinite(q_taken[[0, 3]]).all(), q_taken
    backward = valid_arguments(f"{op_name}_backward")
    backward.update(actions=arguments["actions"], lse_y=out[2], grad_values=torch.zeros(N),
                    grad_q_taken=torch.ones(N))
    if op_name == "fused_linear_residual_q_values":
        backward["expected"] = out[3]
    grads = call(f"{op_name}_backward", backward)
    grad = grads if isinstance(grads, torch.Tensor) else grads[0]  # dQ, or d(adapter_hidden)
    # With grad_values = 0 only the one-hot term is left: rows with an invalid action get none.
    assert (grad[1:3] == 0).all() and (grad[[0, 3]] != 0).any(dim=-1).all(), grad
    if op_name == "fused_linear_residual_q_values":
        valid_rows_only = call(f"{op_name}_backward", {**backward, "grad_q_taken": torch.tensor([1.0, 0, 0, 1])})
        for g, g_ref in zip(grads[1:], valid_rows_only[1:]):
            torch.testing.assert_close(g, g_ref)


def test_empty_mask_gives_nan_loss_not_an_error():
    arguments = valid_arguments("pair_loss")
    arguments["loss_mask"] = torch.zeros(ROWS, T, dtype=torch.bool)
    loss, pref, reg, scores, accuracy, rewards, num_scored = call("pair_loss", arguments)
    assert math.isnan(loss.item()) and math.isnan(reg.item()) and num_scored.item() == 0
    assert (rewards == 0).all() and (scores == 0).all()


@pytest.mark.parametrize("op_name", registered_ops())
def test_inputs_that_require_grad_are_accepted(op_name):
    """E.g. a model's lm_head.weight passed outside no_grad: the op computes what it would without."""
    arguments = valid_arguments(op_name)
    expected = call(op_name, arguments)
    with_grad = {n: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                 else v for n, v in arguments.items()}
    actual = call(op_name, with_grad)
    for e, a in zip(expected if isinstance(expected, tuple) else (expected,),
                    actual if isinstance(actual, tuple) else (actual,)):
        torch.testing.assert_close(a.detach(), e)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_pair_loss_past_the_accumulation_range_matches_the_reference(beta):
    """Rewards whose squares overflow fp32: inf (or 0 * inf = NaN at beta = 0) as fp32 accumulation
    gives on every backend, not an internal error converting the double sum."""
    from qadapter_kernels import reference

    arguments = valid_arguments("pair_loss")
    arguments.update(values=torch.full((ROWS, T), 3e36), q_taken=torch.full((ROWS, T), -3e36), beta=beta,
                     variant="official")
    loss, pref, reg = call("pair_loss", arguments)[:3]
    expected = reference.pair_loss(arguments["values"], arguments["q_taken"], arguments["loss_mask"], gamma=0.9,
                                   beta=beta, variant="official", length_norm=arguments["length_norm"])
    torch.testing.assert_close(reg, expected.reg_loss, equal_nan=True)
    torch.testing.assert_close(loss, expected.loss, equal_nan=True)
    torch.testing.assert_close(pref, expected.pref_loss, equal_nan=True)


@pytest.mark.parametrize("op_name", ["fused_linear_residual_q_values", "fused_linear_residual_q_values_backward"])
def test_a_wrong_cached_base_lse_raises_naming_it(op_name):
    """base_lse (the cached base pass's LSE(L), optional) is checked like every other indexed size."""
    arguments = valid_arguments(op_name)
    assert isinstance(call(op_name, {**arguments, "base_lse": _randn(N, seed=21)}), tuple)  # valid with it
    for what, wrong in wrong_versions(_randn(N, seed=21)):
        with pytest.raises((RuntimeError, ValueError, TypeError), match=r"\bbase_lse\b"):
            call(op_name, {**arguments, "base_lse": wrong})
