"""qk.fused_linear_qadapter_loss: the Q-Adapter loss straight from hidden states and the LM head.

The oracle is the reference loss on materialised logits, ``reference.qadapter_loss(F.linear(
adapter_hidden, W, b), F.linear(base_hidden, W, b), ...)``. Covered: the C++ path (odd and
realistic shapes, every dtype, bias, W with and without a gradient, layouts, tile budgets that
force many tiles and tail tiles), the Triton kernels through the interpreter, fp64 gradcheck,
the memory bound (no [N, V] buffer, measured from the profiler's allocation records), the
dispatcher ops (opcheck, the ops' own outputs at tiny tile sizes, torch.compile fullgraph) and
argument checks.
"""
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qadapter_kernels as qk
from qadapter_kernels import reference

from helpers import (
    ALL_BACKENDS,
    DIFF_FIELDS,
    LOSS_FIELDS,
    assert_close,
    generator,
    interpreted,
    make_pair_batch,
    no_interpreter_with_cuda,
    on_meta,
    poke_arg,
    random_weights,
    set_arg,
    weighted_outputs,
)

ops = torch.ops.qadapter

# Forward outputs are fp32 (fp64) reductions on both sides, but the logits come from differently
# ordered matmuls (tiles vs one F.linear) and the C++ exp is ~1e-6 relative.
TOL = {
    torch.float32: dict(value=dict(rtol=1e-5, atol=1e-5), grad=dict(rtol=1e-4, atol=2e-6)),
    torch.float64: dict(value=dict(rtol=1e-10, atol=1e-10), grad=dict(rtol=1e-10, atol=1e-12)),
    # bf16/fp16: the fused op takes fp32 logits of the low-precision operands; the oracle runs on
    # the same operands upcast to fp32. Gradients come out rounded to the input dtype.
    torch.bfloat16: dict(value=dict(rtol=2e-2, atol=2e-2), grad=dict(rtol=2e-2, atol=2e-3)),
    torch.float16: dict(value=dict(rtol=2e-2, atol=2e-2), grad=dict(rtol=1e-2, atol=5e-4)),
}
KEYWORDS = dict(alpha_tilde=0.9, alpha_0=0.2, gamma=0.95, beta=0.3)  # away from the defaults
FP32_EXACT_KEYWORDS = dict(alpha_tilde=0.875, alpha_0=0.25, gamma=0.9375, beta=0.375)  # the same, as fp32 holds them
TINY_BUDGET_MB = 0.01  # forces the smallest tiles: 64 vocab columns on CPU, a few rows in Triton


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    adapter_hidden: torch.Tensor  # [2B, T, H]
    base_hidden: torch.Tensor  # [2B, T, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    input_ids: torch.Tensor  # [2B, T]
    loss_mask: torch.Tensor  # [2B, T]


def make_problem(B, T, H, V, *, seed, dtype=torch.float32, bias=False, scale=3.0, **layout) -> Problem:
    """Hidden states N(0, 1) and W N(0, scale^2 / H): logits of about scale * N(0, 1); drawn in fp32,
    then cast to dtype. Pair layout (prompt, response, right padding) from make_pair_batch."""
    batch = make_pair_batch(B, T, 1, seed=seed, **layout)  # the pair layout only (V=1: no big logits)
    gen = generator(seed + 1)
    rows = 2 * B
    input_ids = torch.randint(0, V, (rows, T), generator=gen)
    # Right padding (pad id 0) and shared prompts, as make_pair_batch lays them out.
    for i, (p, r) in enumerate(zip(batch.prompt_lens, batch.response_lens)):
        input_ids[i, p + r:] = 0
        if i >= B:
            input_ids[i, :p] = input_ids[i - B, :p]
    ha = torch.randn(rows, T, H, generator=gen)
    hb = torch.randn(rows, T, H, generator=gen)
    w = torch.randn(V, H, generator=gen) * (scale / H**0.5)
    b = torch.randn(V, generator=gen) if bias else None
    return cast_problem(Problem(ha, hb, w, b, input_ids, batch.loss_mask), dtype)


def cast_problem(p: Problem, dtype) -> Problem:
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return Problem(cast(p.adapter_hidden), cast(p.base_hidden), cast(p.weight), cast(p.bias), p.input_ids,
                   p.loss_mask)


def reference_fused(adapter_hidden, base_hidden, lm_head_weight, input_ids, loss_mask, lm_head_bias=None,
                    backend=None, tile_budget_mb=None, **keywords):
    """The oracle: materialised logits through the reference loss (flat hidden states allowed)."""
    shape = (*input_ids.shape, lm_head_weight.shape[0])
    q = F.linear(adapter_hidden, lm_head_weight, lm_head_bias).reshape(shape)
    base = F.linear(base_hidden, lm_head_weight, lm_head_bias).reshape(shape)
    return reference.qadapter_loss(q, base, input_ids, loss_mask, **keywords)


def run(fn, p: Problem, *, dtype=None, w_grad=True, bias_grad=True, hb_grad=True, ha_grad=True, flat=False,
        grad_seed=0, **kwargs):
    """fn on fresh leaves of p (cast to dtype if given), then backward of a random combination of
    every differentiable output. Returns (outputs, {input name: .grad})."""
    def fresh(t, wants_grad):
        if t is None:
            return None
        t = t.detach().clone() if dtype is None else t.detach().to(dtype)
        if flat and t.dim() == 3:
            t = t.reshape(-1, t.shape[-1])
        return t.requires_grad_(wants_grad)

    ha, hb = fresh(p.adapter_hidden, ha_grad), fresh(p.base_hidden, hb_grad)
    w, b = fresh(p.weight, w_grad), fresh(p.bias, bias_grad)
    out = fn(ha, hb, w, p.input_ids, p.loss_mask, lm_head_bias=b, **kwargs)
    if any(getattr(out, name).requires_grad for name in DIFF_FIELDS):
        weighted_outputs(out, grad_seed).backward()
    grads = dict(adapter_hidden=ha.grad, base_hidden=hb.grad, weight=w.grad, bias=None if b is None else b.grad)
    return out, grads


def compare(out, grads, ref, ref_grads, dtype, what="", tol_dtype=None):
    """Every loss output and every gradient (None where the oracle has none) against the oracle."""
    tol = TOL[tol_dtype or dtype]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name in LOSS_FIELDS:
        actual = getattr(out, name)
        assert actual.dtype == acc, f"{what} {name}: dtype {actual.dtype}, expected {acc}"
        assert_close(actual, getattr(ref, name), **tol["value"], what=f"{what} {name}")
    assert grads["base_hidden"] is None, f"{what}: base_hidden received a gradient"
    for name, expected in ref_grads.items():
        if name == "base_hidden":
            continue
        actual = grads[name]
        if expected is None:
            assert actual is None, f"{what}: {name} got a gradient but does not require one"
            continue
        assert actual is not None, f"{what}: {name} requires grad but got none"
        assert actual.dtype == dtype, f"{what} grad {name}: dtype {actual.dtype}, expected {dtype}"
        assert_close(actual, expected, **tol["grad"], what=f"{what} grad {name}")


def check_against_reference(p: Problem, dtype, *, backend="cpu", tile_budget_mb=TINY_BUDGET_MB, what="",
                            tol_dtype=None, **kwargs):
    """The fused op on p in ``dtype`` against the oracle on p upcast to fp32 (fp64 for fp64);
    tolerances of ``tol_dtype`` (default ``dtype``)."""
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    p = cast_problem(p, dtype)  # the oracle sees exactly the fused op's operands, upcast
    out, grads = run(qk.fused_linear_qadapter_loss, p, dtype=dtype, backend=backend,
                     tile_budget_mb=tile_budget_mb, **kwargs)
    ref, ref_grads = run(reference_fused, p, dtype=ref_dtype, **kwargs)
    compare(out, grads, ref, ref_grads, dtype, what=what, tol_dtype=tol_dtype)
    return out, grads


# --------------------------------------------------------------------------- C++ path vs the oracle

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.float64, id="fp64"),
]
GRAD_CASES = [  # (bias, w_grad, bias_grad)
    pytest.param(False, False, False, id="frozen-W"),
    pytest.param(False, True, False, id="W-grad"),
    pytest.param(True, False, False, id="frozen-W-bias"),
    pytest.param(True, True, True, id="W-bias-grad"),
    pytest.param(True, True, False, id="W-grad-frozen-bias"),
    pytest.param(True, False, True, id="bias-grad-only"),
]


@pytest.mark.parametrize("bias, w_grad, bias_grad", GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant, length_norm", [("bellman", True), ("official", False), ("advantage", True)])
def test_cpu_matches_reference_odd_shapes(variant, length_norm, dtype, bias, w_grad, bias_grad, seed):
    """H = 19, V = 203: not a multiple of any block; the tiny budget gives 64-column tiles and an
    11-column tail tile. Unequal responses with right padding (make_pair_batch's layout)."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=bias)
    check_against_reference(p, dtype, w_grad=w_grad, bias_grad=bias_grad, variant=variant,
                            length_norm=length_norm, **KEYWORDS)


@pytest.mark.parametrize("variant, length_norm", [("bellman", False), ("official", True)])
def test_cpu_matches_reference_odd_shapes_other_norms(variant, length_norm, seed):
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    check_against_reference(p, torch.float32, variant=variant, length_norm=length_norm, **KEYWORDS)


def test_cpu_default_hyperparameters(seed):
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    check_against_reference(p, torch.float32)
    check_against_reference(p, torch.float64)


def test_cpu_fp64_margin_above_20(seed):
    """A pair whose margin S_rejected - S_chosen lies in (20, 22), in fp64 (length_norm=False, large
    logits; the first of a fixed list of seeds that gives one). The fused pair pass computes softplus
    and its derivative exactly; so must the oracle: F.softplus's default threshold=20 returns x
    itself above 20 (slope 1), off by log1p(exp(-x)) ~ 1e-9 relative in the gradient."""
    kwargs = dict(KEYWORDS, variant="official", length_norm=False)
    for k in range(200):
        p = cast_problem(make_problem(1, 9, 19, 203, seed=seed + k, bias=True, scale=6.0), torch.float64)
        ha = p.adapter_hidden.clone().requires_grad_()
        out = qk.fused_linear_qadapter_loss(ha, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                                            lm_head_bias=p.bias, backend="cpu", **kwargs)
        margin = (out.rejected_scores - out.chosen_scores).detach()
        if 20 < margin.item() < 22:
            break
    else:
        pytest.fail("no seed gave a margin in (20, 22)")
    # The fused op against exact softplus, through its own scores (value and gradient).
    exact = torch.logaddexp(torch.zeros_like(margin), out.rejected_scores - out.chosen_scores).mean()
    assert_close(out.pref_loss, exact, rtol=1e-14, atol=0, what="pref_loss vs exact softplus")
    (g_fused,) = torch.autograd.grad(out.pref_loss, ha, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, ha)
    assert_close(g_fused, g_exact, rtol=1e-12, atol=1e-15, what="grad pref_loss vs exact softplus")
    # And against the oracle at fp64 tolerances.
    check_against_reference(p, torch.float64, **kwargs)


@pytest.mark.parametrize("dtype, variant, bias", [
    pytest.param(torch.float32, "bellman", True, id="fp32-bellman-bias"),
    pytest.param(torch.bfloat16, "official", False, id="bf16-official"),
    pytest.param(torch.bfloat16, "advantage", True, id="bf16-advantage-bias"),
    pytest.param(torch.float64, "bellman", False, id="fp64-bellman"),
])
def test_cpu_matches_reference_realistic_shape(dtype, variant, bias, seed):
    """2B = 4, T = 64, H = 256, V = 8000 with the default tile budget (one tile) and with 256-column tiles
    (a 64-column tail)."""
    p = make_problem(2, 64, 256, 8000, seed=seed, bias=bias)
    for budget in (None, 0.5):
        check_against_reference(p, dtype, variant=variant, tile_budget_mb=budget, what=f"budget={budget}",
                                **KEYWORDS)


@pytest.mark.parametrize("budget", [TINY_BUDGET_MB, 0.5, 3.0])
def test_cpu_tile_budget_does_not_change_the_result(budget, seed):
    p = make_problem(2, 64, 256, 8000, seed=seed, bias=True)
    tiled, tiled_grads = run(qk.fused_linear_qadapter_loss, p, backend="cpu", tile_budget_mb=budget, **KEYWORDS)
    whole, whole_grads = run(qk.fused_linear_qadapter_loss, p, backend="cpu", **KEYWORDS)
    for name in LOSS_FIELDS:
        assert_close(getattr(tiled, name), getattr(whole, name), rtol=1e-5, atol=1e-6, what=name)
    # Tiles change the fp32 summation order. atol scales with the gradients, which the default
    # summed scores (length_norm="none") make up to T times larger than per-token means did.
    for name in ("adapter_hidden", "weight", "bias"):
        atol = 4e-6 * float(whole_grads[name].abs().max())  # ~32 fp32 ulps of the largest entry
        assert_close(tiled_grads[name], whole_grads[name], rtol=1e-4, atol=atol, what=f"grad {name}")


@pytest.mark.parametrize("budget", [TINY_BUDGET_MB, 0.5])
def test_cpu_maximum_moving_along_the_vocabulary(budget, seed):
    """Bias spikes past the first tiles move every row's running max, by 30 and by 200: the
    softmax numerators that E accumulates (the fused forward folds in two passes, writing them
    over the logits tile) must be rescaled with the running sum each time."""
    p = make_problem(2, 32, 64, 8000, seed=seed, bias=True)
    p.bias[3000] += 30.0
    p.bias[6000] += 200.0
    check_against_reference(p, torch.float32, variant="bellman", tile_budget_mb=budget, **KEYWORDS)


def test_cpu_row_tiles_with_tail(seed):
    """N = 2200 > 2048 rows: the C++ path tiles rows too (2048 + a 152-row tail)."""
    p = make_problem(1, 1100, 24, 150, seed=seed, bias=True)
    for dtype in (torch.float32, torch.float64):
        check_against_reference(p, dtype, variant="bellman", what=str(dtype), **KEYWORDS)


def test_cpu_explicit_pair_layout(seed):
    """Unequal lengths and right padding, spelled out: a chosen response running to the last column,
    a one-token rejected response, and a rejected response with an empty mask."""
    layout = dict(prompt_lens=[2, 3, 4, 2, 3, 4], response_lens=[10, 4, 1, 1, 7, 0])
    p = make_problem(3, 12, 19, 203, seed=seed, bias=True, **layout)
    assert not p.loss_mask[5].any() and p.loss_mask[0, -1] and not p.loss_mask[3, 4:].any()
    for variant in ("bellman", "official"):
        for dtype in (torch.float32, torch.float64):
            check_against_reference(p, dtype, variant=variant, what=f"{variant} {dtype}", **KEYWORDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_flat_layout(dtype, seed):
    """[2B*T, H] hidden states give the same result as [2B, T, H]; the gradient keeps the flat shape."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    flat, flat_grads = check_against_reference(p, dtype, flat=True, **KEYWORDS)
    full, full_grads = run(qk.fused_linear_qadapter_loss, p, dtype=dtype, backend="cpu",
                           tile_budget_mb=TINY_BUDGET_MB, **KEYWORDS)
    assert flat_grads["adapter_hidden"].shape == (2 * 2 * 9, 19)
    tol = TOL[dtype]
    for name in LOSS_FIELDS:
        assert_close(getattr(flat, name), getattr(full, name), **tol["value"], what=name)
    assert_close(flat_grads["adapter_hidden"], full_grads["adapter_hidden"].reshape(-1, 19), **tol["grad"],
                 what="grad adapter_hidden")
    assert_close(flat_grads["weight"], full_grads["weight"], **tol["grad"], what="grad weight")


def test_cpu_strided_inputs_and_integer_ids(seed):
    """Hidden states and W that are views with a row stride != H (sliced from wider tensors),
    int32 input_ids and a uint8 loss_mask."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    wide = lambda t: torch.cat([t, torch.full_like(t[..., :5], 1e3)], -1)[..., : t.shape[-1]]  # noqa: E731
    strided = Problem(wide(p.adapter_hidden), wide(p.base_hidden), wide(p.weight), p.bias,
                      p.input_ids.int(), p.loss_mask.to(torch.uint8))
    assert not strided.weight.is_contiguous() and not strided.adapter_hidden.is_contiguous()

    # Not the run() helper: it would make contiguous copies. The leaves are the wide tensors.
    leaf_ha = strided.adapter_hidden._base.clone().requires_grad_()
    leaf_w = strided.weight._base.clone().requires_grad_()
    out = qk.fused_linear_qadapter_loss(leaf_ha[..., :19], strided.base_hidden, leaf_w[:, :19], strided.input_ids,
                                        strided.loss_mask, lm_head_bias=p.bias, backend="cpu",
                                        tile_budget_mb=TINY_BUDGET_MB, **KEYWORDS)
    weighted_outputs(out, 0).backward()
    ref, ref_grads = run(reference_fused, p, bias_grad=False, **KEYWORDS)
    for name in LOSS_FIELDS:
        assert_close(getattr(out, name), getattr(ref, name), **TOL[torch.float32]["value"], what=name)
    g = TOL[torch.float32]["grad"]
    assert_close(leaf_ha.grad[..., :19], ref_grads["adapter_hidden"], **g, what="grad adapter_hidden")
    assert_close(leaf_w.grad[:, :19], ref_grads["weight"], **g, what="grad weight")
    assert not leaf_ha.grad[..., 19:].any() and not leaf_w.grad[:, 19:].any()


def test_cpu_weight_grad_only(seed):
    """adapter_hidden not requiring grad (no E accumulated in the forward), W and bias requiring it."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    out, grads = check_against_reference(p, torch.float32, ha_grad=False, **KEYWORDS)
    assert grads["adapter_hidden"] is None and grads["weight"] is not None


def test_cpu_no_grad_forward(seed):
    """Under no_grad the forward needs no E and gives the same outputs, none requiring grad."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    ref = reference_fused(p.adapter_hidden, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                          lm_head_bias=p.bias, **KEYWORDS)
    ha = p.adapter_hidden.clone().requires_grad_()
    with torch.no_grad():
        out = qk.fused_linear_qadapter_loss(ha, p.base_hidden, p.weight, p.input_ids, p.loss_mask,
                                            lm_head_bias=p.bias, backend="cpu", tile_budget_mb=TINY_BUDGET_MB,
                                            **KEYWORDS)
    for name in LOSS_FIELDS:
        assert not getattr(out, name).requires_grad
        assert_close(getattr(out, name), getattr(ref, name), **TOL[torch.float32]["value"], what=name)


def test_cpu_default_backend_is_cpu(seed):
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    check_against_reference(p, torch.float32, backend=None, **KEYWORDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_torch_backend_matches_reference(dtype, seed):
    """backend="torch" materialises the logits; like the fused paths, the base stream gives W and
    the bias no gradient (docs/DESIGN.md §2: base logits never receive a gradient)."""
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)
    check_against_reference(p, dtype, backend="torch", **KEYWORDS)


# --------------------------------------------------------------------------- Triton (interpreter)

TRITON_SHAPES = [  # (B, T, H, V): H, V never multiples of the blocks (32, 64)
    pytest.param(1, 7, 19, 203, id="N14-H19-V203"),  # one row block; 12-row dQ chunks + a 2-row tail
    pytest.param(2, 20, 40, 130, id="N80-H40-V130"),  # two row blocks (64 + 16), two K steps
]


@no_interpreter_with_cuda
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("B, T, H, V", TRITON_SHAPES)
def test_triton_interpreter_matches_reference(B, T, H, V, dtype, bias, seed):
    assert interpreted("triton", "cpu")
    p = make_problem(B, T, H, V, seed=seed, bias=bias)
    variant = "bellman" if B == 1 else "official"
    # fp64 inputs are computed in fp64 (they were computed in fp32 and returned
    # as fp64), so fp64 gets fp64 tolerances. Triton passes scalar arguments as fp32: the
    # hyper-parameters here are fp32-exact, so they cost nothing.
    check_against_reference(p, dtype, backend="triton", variant=variant, **FP32_EXACT_KEYWORDS)


@no_interpreter_with_cuda
def test_triton_interpreter_frozen_weight_and_default_budget(seed):
    p = make_problem(1, 7, 19, 203, seed=seed, bias=True)
    check_against_reference(p, torch.float32, backend="triton", w_grad=False, bias_grad=False,
                            tile_budget_mb=None)
    check_against_reference(p, torch.float32, backend="triton", ha_grad=False, flat=True, tile_budget_mb=None)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("variant", ["bellman", "official", "advantage"])
def test_gradcheck_cpu_fp64(variant, seed):
    """Numerical vs analytic gradients of every differentiable output; V = 70 gives a 64-column tile
    and a 6-column tail.

    W and the bias also make the base logits, which by design pass no gradient (a stop-gradient
    that finite differences cannot see): W and bias are checked with alpha_0 = 0, where the
    outputs do not depend on the base logits; adapter_hidden with alpha_0 != 0 as well.
    """
    p = make_problem(1, 4, 5, 70, seed=seed, dtype=torch.float64, bias=True, scale=2.0)

    def f(ha, w, b, alpha_0):
        keywords = dict(KEYWORDS, alpha_0=alpha_0)
        out = qk.fused_linear_qadapter_loss(ha, p.base_hidden, w, p.input_ids, p.loss_mask, lm_head_bias=b,
                                            variant=variant, backend="cpu", tile_budget_mb=TINY_BUDGET_MB,
                                            **keywords)
        return tuple(getattr(out, name) for name in DIFF_FIELDS)

    ha, w, b = (t.clone().requires_grad_() for t in (p.adapter_hidden, p.weight, p.bias))
    assert torch.autograd.gradcheck(lambda ha, w, b: f(ha, w, b, 0.0), (ha, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda ha: f(ha, p.weight, p.bias, 0.2), (ha,), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


# --------------------------------------------------------------------------- memory


def _load_runner():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "runner.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("fused_linear_bench_runner", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _profiled_cpu_peak(fn) -> int:
    """Peak of the running sum of the profiler's CPU allocation records (+bytes alloc, -bytes free)."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in records:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_peak(fn) -> int:
    runner = _load_runner()
    measure = getattr(runner, "measure_peak_memory", None) if runner is not None else None
    return measure(fn) if measure is not None else _profiled_cpu_peak(fn)


def test_peak_memory_helper_sees_big_buffers():
    """The measurement itself: a [N, V] temporary freed inside fn still shows in the peak."""
    nbytes = 512 * 32000 * 4
    assert measure_peak(lambda: torch.empty(512, 32000).sum()) >= nbytes


@pytest.mark.parametrize("w_grad", [False, True], ids=["frozen-W", "W-grad"])
def test_peak_memory_never_holds_n_by_v(w_grad, seed):
    """Forward + backward at N = 512, H = 64, V = 32000 with a 4 MiB tile budget: the extra memory
    (beyond the gradients of W and bias, which are outputs) stays far below one fp32 [N, V] tensor,
    while the reference path's peak exceeds it."""
    N, H, V = 512, 64, 32000
    nv_bytes = N * V * 4
    p = make_problem(1, N // 2, H, V, seed=seed, bias=True)
    ha = p.adapter_hidden.clone().requires_grad_()
    w = p.weight.clone().requires_grad_(w_grad)
    b = p.bias.clone().requires_grad_(w_grad)
    outputs_bytes = (w.numel() + b.numel()) * 4 if w_grad else 0

    def step(fn, **kwargs):
        def go():
            for t in (ha, w, b):
                t.grad = None
            fn(ha, p.base_hidden, w, p.input_ids, p.loss_mask, lm_head_bias=b, **kwargs).loss.backward()
        return go

    fused_peak = measure_peak(step(qk.fused_linear_qadapter_loss, backend=None, tile_budget_mb=4)) - outputs_bytes
    reference_peak = measure_peak(step(reference_fused))
    assert reference_peak > nv_bytes, (reference_peak, nv_bytes)
    assert fused_peak < 0.25 * nv_bytes, f"fused peak {fused_peak / 2**20:.1f} MiB vs [N, V] {nv_bytes / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- the dispatcher ops


def _op_args(*, n=10, hidden=7, vocab=23, seed=0, dtype=torch.float64, bias=False, w_grad=False, bias_grad=False,
             ha_grad=True, tile_rows=3, tile_vocab=5):
    gen = generator(seed)
    ha = torch.randn(n, hidden, generator=gen, dtype=dtype)
    hb = torch.randn(n, hidden, generator=gen, dtype=dtype)
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype)
    b = torch.randn(vocab, generator=gen, dtype=dtype) if bias else None
    actions = torch.randint(0, vocab, (n,), generator=gen)
    ha.requires_grad_(ha_grad)
    w.requires_grad_(w_grad)
    if b is not None:
        b.requires_grad_(bias_grad)
    return (ha, hb, w, b, actions, 0.9, 0.2, tile_rows, tile_vocab, ha_grad)


@pytest.mark.parametrize("bias, bias_grad", [(False, False), (True, False), (True, True)],
                         ids=["no-bias", "bias", "bias-grad"])
@pytest.mark.parametrize("w_grad", [False, True], ids=["frozen-W", "W-grad"])
def test_opcheck_fused_linear_residual_q_values(w_grad, bias, bias_grad):
    args = _op_args(bias=bias, w_grad=w_grad, bias_grad=bias_grad)
    torch.library.opcheck(ops.fused_linear_residual_q_values, args)


def test_opcheck_fused_linear_residual_q_values_no_grad_fp32():
    torch.library.opcheck(ops.fused_linear_residual_q_values,
                          _op_args(dtype=torch.float32, bias=True, ha_grad=False, tile_rows=4, tile_vocab=64))


def _backward_args(*, bias, with_expected=True, seed=0):
    ha, hb, w, b, actions, at, a0, tr, tv, _ = _op_args(bias=bias, ha_grad=False, seed=seed)
    _, _, lse_y, expected = ops.fused_linear_residual_q_values(ha, hb, w, b, actions, at, a0, tr, tv,
                                                               with_expected)
    gen = generator(seed + 1)
    grad_values = torch.randn(ha.shape[0], generator=gen, dtype=ha.dtype)
    grad_q_taken = torch.randn(ha.shape[0], generator=gen, dtype=ha.dtype)
    return (grad_values, grad_q_taken, ha, hb, w, b, actions, lse_y, expected, at, a0, tr, tv)


@pytest.mark.parametrize("bias, with_expected, output_mask", [
    (False, True, [True, False, False]),
    (False, True, [False, True, False]),
    (True, True, [False, False, True]),
    (True, True, [True, True, True]),
    (True, False, [False, True, True]),  # the forward ran without E (adapter_hidden needed no grad)
    (False, True, [False, False, False]),
])
def test_opcheck_fused_linear_residual_q_values_backward(bias, with_expected, output_mask):
    args = _backward_args(bias=bias, with_expected=with_expected)
    torch.library.opcheck(ops.fused_linear_residual_q_values_backward, (*args, output_mask))


@pytest.mark.parametrize("tile_rows, tile_vocab", [(1, 1), (3, 5), (4, 64), (100, 7), (10, 23)])
def test_ops_outputs_at_any_tile_size(tile_rows, tile_vocab):
    """The ops themselves at tile sizes the planner never picks (row tails, 1-wide tiles) against the
    reference on materialised logits: values, q_taken, lse_y, E = softmax(y) @ W and all gradients."""
    ha, hb, w, b, actions, at, a0, _, _, _ = _op_args(n=10, bias=True, ha_grad=False)
    values, q_taken, lse_y, expected = ops.fused_linear_residual_q_values(ha, hb, w, b, actions, at, a0,
                                                                          tile_rows, tile_vocab, True)
    ha_r, w_r, b_r = (t.clone().requires_grad_() for t in (ha, w, b))
    q = F.linear(ha_r, w_r, b_r)
    base = F.linear(hb, w, b)
    ref_values, ref_q_taken = reference.residual_q_values(q, base, actions, alpha_tilde=at, alpha_0=a0)
    y = (q + a0 * base) / at
    tol = dict(rtol=1e-10, atol=1e-12)
    assert_close(values, ref_values, **tol, what="values")
    assert_close(q_taken, ref_q_taken, **tol, what="q_taken")
    assert_close(lse_y, torch.logsumexp(y, -1), **tol, what="lse_y")
    assert_close(expected, torch.softmax(y, -1) @ w, **tol, what="expected")

    grad_values, grad_q_taken = random_weights(values.shape, 1), random_weights(values.shape, 2)
    (grad_values * ref_values + grad_q_taken * ref_q_taken).sum().backward()
    g_h, g_w, g_b = ops.fused_linear_residual_q_values_backward(
        grad_values, grad_q_taken, ha, hb, w, b, actions, lse_y, expected, at, a0, tile_rows, tile_vocab,
        [True, True, True])
    assert_close(g_h, ha_r.grad, **tol, what="grad adapter_hidden")
    assert_close(g_w, w_r.grad, **tol, what="grad weight")
    assert_close(g_b, b_r.grad, **tol, what="grad bias")
    g_h, g_w, g_b = ops.fused_linear_residual_q_values_backward(
        grad_values, grad_q_taken, ha, hb, w, b, actions, lse_y, expected, at, a0, tile_rows, tile_vocab,
        [False, True, False])
    assert g_h.numel() == 0 and g_b.numel() == 0
    assert_close(g_w, w_r.grad, **tol, what="grad weight alone")


@pytest.mark.parametrize("w_grad", [False, True], ids=["frozen-W", "W-grad"])
def test_compile_fullgraph_fused_linear_loss(w_grad, seed):
    """torch.compile(fullgraph=True) through qk.fused_linear_qadapter_loss(...).loss, equal to eager
    (loss, grad of adapter_hidden, and of W when it requires one); the graph calls the fused op."""
    torch._dynamo.reset()
    p = make_problem(2, 9, 19, 203, seed=seed, bias=True)

    def f(ha, hb, w, b, ids, mask):
        return qk.fused_linear_qadapter_loss(ha, hb, w, ids, mask, lm_head_bias=b, tile_budget_mb=TINY_BUDGET_MB,
                                             **KEYWORDS).loss

    def call(fn):
        ha = p.adapter_hidden.clone().requires_grad_()
        w = p.weight.clone().requires_grad_(w_grad)
        loss = fn(ha, p.base_hidden, w, p.bias, p.input_ids, p.loss_mask)
        loss.backward()
        return loss, ha.grad, w.grad

    graphs = []

    def recorder(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    loss_c, ha_grad_c, w_grad_c = call(torch.compile(f, fullgraph=True))
    loss_e, ha_grad_e, w_grad_e = call(f)
    assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6, what="compiled loss")
    assert_close(ha_grad_c, ha_grad_e, rtol=1e-5, atol=1e-8, what="compiled grad adapter_hidden")
    if w_grad:
        assert_close(w_grad_c, w_grad_e, rtol=1e-5, atol=1e-8, what="compiled grad weight")
    else:
        assert w_grad_c is None

    torch._dynamo.reset()
    torch.compile(f, fullgraph=True, backend=recorder)(p.adapter_hidden.clone().requires_grad_(), p.base_hidden,
                                                       p.weight, p.bias, p.input_ids, p.loss_mask)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("qadapter.fused_linear_residual_q_values" in t for t in targets), targets
    torch._dynamo.reset()


# --------------------------------------------------------------------------- bad input

BAD_B, BAD_T, BAD_H, BAD_V = 2, 6, 5, 13


def _valid_args(device="cpu") -> dict:
    p = make_problem(BAD_B, BAD_T, BAD_H, BAD_V, seed=7, bias=True)
    return dict(adapter_hidden=p.adapter_hidden.to(device), base_hidden=p.base_hidden.to(device),
                lm_head_weight=p.weight.to(device), input_ids=p.input_ids.to(device),
                loss_mask=p.loss_mask.to(device), lm_head_bias=p.bias.to(device))


def _rows(n_rows):
    """input_ids, loss_mask and both hidden states with n_rows rows (consistently)."""
    def mutate(args):
        for name in ("adapter_hidden", "base_hidden", "input_ids", "loss_mask"):
            t = args[name]
            args[name] = torch.cat([t, t])[:n_rows]
    return mutate


NONFINITE = r"adapter_hidden, base_hidden or lm_head_weight.*NaN"
BAD_CASES = {  # name -> (mutation, exception, regex the message must contain)
    "H mismatch": (set_arg("adapter_hidden", lambda a: torch.randn(2 * BAD_B, BAD_T, BAD_H + 1)), ValueError,
                   r"adapter_hidden must be \[2B, T, H\]"),
    "H mismatch in weight": (set_arg("lm_head_weight", lambda a: torch.randn(BAD_V, BAD_H + 1)), ValueError,
                             r"adapter_hidden must be \[2B, T, H\]"),
    "base_hidden shape": (set_arg("base_hidden", lambda a: a["base_hidden"][:, :-1]), ValueError,
                          r"base_hidden must have shape"),
    "base_hidden flat while adapter_hidden is not": (
        set_arg("base_hidden", lambda a: a["base_hidden"].reshape(-1, BAD_H)), ValueError, r"base_hidden must have shape"),
    "weight 3-D": (set_arg("lm_head_weight", lambda a: a["lm_head_weight"][None]), ValueError,
                   r"lm_head_weight must be \[V, H\]"),
    "weight 1-D": (set_arg("lm_head_weight", lambda a: a["lm_head_weight"][:, 0]), ValueError,
                   r"lm_head_weight must be \[V, H\]"),
    "weight empty vocabulary": (set_arg("lm_head_weight", lambda a: a["lm_head_weight"][:0]), ValueError,
                                r"lm_head_weight must be \[V, H\] with V >= 1"),
    "bias wrong length": (set_arg("lm_head_bias", lambda a: a["lm_head_bias"][:-1]), ValueError,
                          r"lm_head_bias must have shape"),
    "bias 2-D": (set_arg("lm_head_bias", lambda a: a["lm_head_bias"][None]), ValueError, r"lm_head_bias must have shape"),
    "odd rows": (_rows(2 * BAD_B - 1), ValueError, r"input_ids must hold 2B rows"),
    "hidden rows != input_ids rows": (
        set_arg("adapter_hidden", lambda a: torch.cat([a["adapter_hidden"]] * 2)), ValueError,
        r"adapter_hidden must be \[2B, T, H\]"),
    "flat hidden rows != 2B*T": (
        set_arg("adapter_hidden", lambda a: a["adapter_hidden"].reshape(-1, BAD_H)[:-1]), ValueError,
        r"adapter_hidden must be \[2B, T, H\]"),
    "loss_mask shape": (set_arg("loss_mask", lambda a: a["loss_mask"][:, :-1]), ValueError, r"loss_mask must have shape"),
    "input_ids >= V": (poke_arg("input_ids", (1, 3), BAD_V), ValueError, r"input_ids must be token ids in \[0, 13\)"),
    "input_ids < 0": (poke_arg("input_ids", (0, 0), -1), ValueError, r"input_ids must be token ids in \[0, 13\)"),
    "float input_ids": (set_arg("input_ids", lambda a: a["input_ids"].float()), TypeError, r"input_ids must be an integer"),
    "integer adapter_hidden": (set_arg("adapter_hidden", lambda a: a["adapter_hidden"].long()), TypeError,
                               r"adapter_hidden must be float"),
    "integer base_hidden": (set_arg("base_hidden", lambda a: a["base_hidden"].int()), TypeError,
                            r"base_hidden must be float"),
    "integer weight": (set_arg("lm_head_weight", lambda a: a["lm_head_weight"].long()), TypeError,
                       r"lm_head_weight must be float"),
    "integer bias": (set_arg("lm_head_bias", lambda a: a["lm_head_bias"].long()), TypeError, r"lm_head_bias must be float"),
    "hidden not a tensor": (set_arg("adapter_hidden", lambda a: a["adapter_hidden"].tolist()), TypeError,
                            r"adapter_hidden must be a torch\.Tensor"),
    "weight dtype": (set_arg("lm_head_weight", lambda a: a["lm_head_weight"].double()), TypeError,
                     r"lm_head_weight dtype .* differs from adapter_hidden"),
    "base_hidden dtype": (set_arg("base_hidden", lambda a: a["base_hidden"].bfloat16()), TypeError,
                          r"base_hidden dtype .* differs from adapter_hidden"),
    "bias dtype": (set_arg("lm_head_bias", lambda a: a["lm_head_bias"].double()), TypeError,
                   r"lm_head_bias dtype .* differs from adapter_hidden"),
    "NaN in adapter_hidden": (poke_arg("adapter_hidden", (1, 2, 0), float("nan")), ValueError, NONFINITE),
    "NaN in base_hidden": (poke_arg("base_hidden", (3, 4, 1), float("nan")), ValueError, NONFINITE),
    "inf in weight": (poke_arg("lm_head_weight", (4, 2), float("inf")), ValueError, r"adapter_hidden, base_hidden or "
                      r"lm_head_weight"),
    "tile_budget_mb 0": (set_arg("tile_budget_mb", lambda a: 0), ValueError, r"tile_budget_mb must be a positive"),
    "tile_budget_mb < 0": (set_arg("tile_budget_mb", lambda a: -1.0), ValueError, r"tile_budget_mb must be a positive"),
    "tile_budget_mb NaN": (set_arg("tile_budget_mb", lambda a: float("nan")), ValueError,
                           r"tile_budget_mb must be a positive"),
    "tile_budget_mb bool": (set_arg("tile_budget_mb", lambda a: True), ValueError, r"tile_budget_mb must be a positive"),
    "base_hidden on meta": (on_meta("base_hidden"), ValueError, r"base_hidden is on meta but adapter_hidden is on"),
    "weight on meta": (on_meta("lm_head_weight"), ValueError, r"lm_head_weight is on meta but adapter_hidden is on"),
    "bias on meta": (on_meta("lm_head_bias"), ValueError, r"lm_head_bias is on meta but adapter_hidden is on"),
    "input_ids on meta": (on_meta("input_ids"), ValueError, r"input_ids is on meta but"),
    "empty loss_mask": (set_arg("loss_mask", lambda a: torch.zeros_like(a["loss_mask"])), ValueError,
                        r"loss_mask scores no token"),
    "bad variant": (set_arg("variant", lambda a: "dpo"), ValueError, r"variant must be one of"),
}


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_valid_call(backend, device):
    out = qk.fused_linear_qadapter_loss(**_valid_args(device), backend=backend, tile_budget_mb=TINY_BUDGET_MB)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_bad_input(case, backend, device):
    mutate, exc, pattern = BAD_CASES[case]
    args = _valid_args(device)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        qk.fused_linear_qadapter_loss(**args, backend=backend)


# --------------------------------------------------------------------------- backends agree

from qadapter_kernels.ops.fused_linear import fused_linear_rows  # noqa: E402


@pytest.mark.parametrize("via_dispatcher", [True, False], ids=["cpu-op", "triton-interpreter"])
def test_grad_weight_accumulates_in_fp32_across_chunks(via_dispatcher):
    """grad(W) for bf16 weights summed over 96 one-row chunks. Every chunk adds
    a positive term, so a bf16 running sum loses the later ones (percent errors); accumulated in
    fp32 and cast once, only the final bf16 rounding remains."""
    if not via_dispatcher and not interpreted("triton", "cpu"):
        pytest.skip("the Triton launchers run on CPU tensors only in the interpreter")
    n, hidden, vocab = 96, 16, 70
    gen = torch.Generator().manual_seed(4)
    ha = (torch.rand(n, hidden, generator=gen) + 0.5).bfloat16()
    hb = (torch.rand(n, hidden, generator=gen) + 0.5).bfloat16()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).bfloat16().requires_grad_()
    actions = torch.randint(0, vocab, (n,), generator=gen)
    values, _ = fused_linear_rows(ha, hb, w, None, actions, 0.875, 0.25, 1, vocab, False, via_dispatcher)
    values.sum().backward()
    w64, ha64, hb64 = w.detach().double(), ha.double(), hb.double()
    y = (ha64 @ w64.T + 0.25 * (hb64 @ w64.T)) / 0.875
    expected = y.softmax(-1).T @ ha64  # dV/dQ = softmax(y); the base stream gives W no gradient
    assert w.grad.dtype == torch.bfloat16
    assert_close(w.grad, expected, rtol=1e-2, atol=1e-3, what="grad_W")


@pytest.mark.parametrize("via_dispatcher", [False], ids=["triton-interpreter"])
def test_out_of_range_action_gives_nan_and_no_one_hot_gradient(via_dispatcher):
    """The Triton fused forward used to return q_taken = 0 for an action outside
    [0, V) and its backward indexed W[a]; now q_taken is NaN there (as on every backend) and the
    backward adds no one-hot term for it (checks off: torch.compile / CUDA graphs)."""
    if not interpreted("triton", "cpu"):
        pytest.skip("the Triton launchers run on CPU tensors only in the interpreter")
    n, hidden, vocab = 5, 8, 11
    gen = torch.Generator().manual_seed(6)
    ha = torch.randn(n, hidden, generator=gen, requires_grad=True)
    hb, w = torch.randn(n, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen)
    actions = torch.tensor([3, vocab, -1, 0, vocab + 7])
    bad = (actions < 0) | (actions >= vocab)
    values, q_taken = fused_linear_rows(ha, hb, w, None, actions, 1.0, 0.01, n, vocab, True, via_dispatcher)
    assert torch.isnan(q_taken[bad]).all() and torch.isfinite(q_taken[~bad]).all()
    assert_close(q_taken[~bad], (ha.detach() @ w.T)[~bad].gather(1, actions[~bad, None]).squeeze(1),
                 rtol=1e-5, atol=1e-5, what="q_taken")
    (values.sum() + torch.where(bad, 0.0, q_taken).sum()).backward()
    y = (ha.detach() @ w.T + 0.01 * (hb @ w.T))
    expected = y.softmax(-1) @ w + torch.where(bad[:, None], 0.0, w[actions.clamp(0, vocab - 1)])
    assert_close(ha.grad, expected, rtol=1e-5, atol=1e-5, what="grad(adapter_hidden)")
