"""Bad arguments give a ValueError or TypeError whose message names the argument, on every backend.

Each case starts from a valid call (checked to pass in test_*_valid_call) and breaks one thing.
"""
import pytest
import torch

import qadapter_kernels as qk
from qadapter_kernels import reference
from qadapter_kernels.ops import backend as _backend

from helpers import (ALL_BACKENDS, FUSED, assert_close, make_pair_batch, make_rows, poke_arg, requires_cuda,
                     set_arg)

B, T, V = 2, 6, 13
# The message names both logits (which one is bad is not known without another pass).
NONFINITE = r"q_logits or base_logits.*NaN or \+inf, or a row with no finite entry"


def loss_args(device) -> dict:
    batch = make_pair_batch(B, T, V, seed=11).to(device)
    return dict(q_logits=batch.q_logits, base_logits=batch.base_logits, input_ids=batch.input_ids,
                loss_mask=batch.loss_mask)


def rqv_args(device) -> dict:
    q, base, actions = make_rows(0, V, lead=(3, 4), seed=12)
    return dict(q_logits=q.to(device), base_logits=base.to(device), actions=actions.to(device))




def _meta(name):
    return set_arg(name, lambda a: torch.empty_like(a[name], device="meta"))


# name -> (mutation, exception, regex the message must contain)
COMMON_CASES = {
    "q_logits not a tensor": (set_arg("q_logits", lambda a: a["q_logits"].tolist()), TypeError,
                              r"q_logits must be a torch\.Tensor"),
    "integer q_logits": (set_arg("q_logits", lambda a: a["q_logits"].long()), TypeError, r"q_logits must be float"),
    "integer base_logits": (set_arg("base_logits", lambda a: a["base_logits"].int()), TypeError,
                            r"base_logits must be float"),
    "mixed dtypes": (set_arg("base_logits", lambda a: a["base_logits"].double()), TypeError,
                     r"base_logits dtype .* differs from q_logits"),
    "base_logits shape": (set_arg("base_logits", lambda a: a["base_logits"][..., :-1]), ValueError,
                          r"base_logits must have shape"),
    "base_logits on another device": (_meta("base_logits"), ValueError, r"base_logits is on meta but q_logits is on"),
    "NaN in q_logits": (poke_arg("q_logits", (1, 2, 3), float("nan")), ValueError, NONFINITE),
    "NaN in base_logits": (poke_arg("base_logits", (0, 0, 0), float("nan")), ValueError, NONFINITE),
    "+inf in q_logits": (poke_arg("q_logits", (2, 1, 5), float("inf")), ValueError, NONFINITE),
    "+inf in base_logits": (poke_arg("base_logits", (1, 3, 0), float("inf")), ValueError, NONFINITE),
    "row of -inf in q_logits": (poke_arg("q_logits", (1, 1), float("-inf")), ValueError, NONFINITE),
    "row of -inf in base_logits": (poke_arg("base_logits", (2, 0), float("-inf")), ValueError, NONFINITE),
    "alpha_tilde = 0": (set_arg("alpha_tilde", lambda a: 0.0), ValueError, r"alpha_tilde must be in \(0"),
    "alpha_tilde < 0": (set_arg("alpha_tilde", lambda a: -1.0), ValueError, r"alpha_tilde must be in \(0"),
    "alpha_tilde = inf": (set_arg("alpha_tilde", lambda a: float("inf")), ValueError, r"alpha_tilde must be in"),
    "alpha_tilde = nan": (set_arg("alpha_tilde", lambda a: float("nan")), ValueError, r"alpha_tilde must be in"),
    "alpha_tilde a string": (set_arg("alpha_tilde", lambda a: "1.0"), TypeError, r"alpha_tilde must be a real number"),
    "alpha_tilde a bool": (set_arg("alpha_tilde", lambda a: True), TypeError, r"alpha_tilde must be a real number"),
    "alpha_0 < 0": (set_arg("alpha_0", lambda a: -0.01), ValueError, r"alpha_0 must be in \[0"),
    "bad backend": (set_arg("backend", lambda a: "cuda"), ValueError, r"backend must be one of"),
}

LOSS_CASES = {
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
    "input_ids = V": (poke_arg("input_ids", (0, 2), V), ValueError, r"input_ids must be token ids in \[0, 13\)"),
    "input_ids on another device": (_meta("input_ids"), ValueError, r"input_ids is on meta"),
    "loss_mask on another device": (_meta("loss_mask"), ValueError, r"loss_mask is on meta"),
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

RQV_CASES = {
    **COMMON_CASES,
    "V = 0": (lambda a: a.update({k: a[k][..., :0] for k in ("q_logits", "base_logits")}),
              ValueError, r"q_logits must be \[\.\.\., V\] with V >= 1"),
    "actions shape": (set_arg("actions", lambda a: a["actions"][:, :-1]), ValueError, r"actions must have shape"),
    "actions float": (set_arg("actions", lambda a: a["actions"].float()), TypeError, r"actions must be an integer"),
    "actions negative": (poke_arg("actions", (1, 2), -1), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions = V": (poke_arg("actions", (2, 3), V), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions huge": (poke_arg("actions", (0, 0), 2**40), ValueError, r"actions must be token ids in \[0, 13\)"),
    "actions on another device": (_meta("actions"), ValueError, r"actions is on meta"),
}


def _call(fn, args, backend):
    args = dict(args)
    backend = args.pop("backend", backend)
    return fn(**args, backend=backend)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_loss_valid_call(backend, device):
    out = _call(qk.qadapter_loss, loss_args(device), backend)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_residual_q_values_valid_call(backend, device):
    values, _ = _call(qk.residual_q_values, rqv_args(device), backend)
    assert torch.isfinite(values).all()


@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_loss_rejects(backend, device, case):
    mutate, exc, pattern = LOSS_CASES[case]
    args = loss_args(device)
    if case == "-inf Q at a scored action":
        assert args["loss_mask"][0, 2]  # so bellman (the default) scores the action at t = 1
    mutate(args)
    with pytest.raises(exc, match=pattern):
        _call(qk.qadapter_loss, args, backend)


@pytest.mark.parametrize("case", list(RQV_CASES))
@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_residual_q_values_rejects(backend, device, case):
    mutate, exc, pattern = RQV_CASES[case]
    args = rqv_args(device)
    mutate(args)
    with pytest.raises(exc, match=pattern):
        _call(qk.residual_q_values, args, backend)


# --------------------------------------------------------------------------- which masks score nothing


# (mask columns set True, variant) -> whether anything is scored.
#   bellman scores the action at t iff mask[t+1]: a mask with only column 0 scores nothing.
#   official scores it iff mask[t] and t < T-1: a mask with only the last column scores nothing.
MASK_CASES = [
    pytest.param([], "bellman", False, id="none-bellman"),
    pytest.param([], "official", False, id="none-official"),
    pytest.param([0], "bellman", False, id="first-col-bellman"),
    pytest.param([0], "official", True, id="first-col-official"),
    pytest.param([T - 1], "bellman", True, id="last-col-bellman"),
    pytest.param([T - 1], "official", False, id="last-col-official"),
    pytest.param([0, T - 1], "bellman", True, id="first-and-last-bellman"),
    pytest.param([0, T - 1], "official", True, id="first-and-last-official"),
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
            _call(qk.qadapter_loss, {**args, "variant": variant}, backend)
        return
    out = _call(qk.qadapter_loss, {**args, "variant": variant}, backend)
    ref = reference.qadapter_loss(**{k: v.cpu() for k, v in args.items()}, variant=variant)
    assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5, what="loss")


# --------------------------------------------------------------------------- backend / device choice


@pytest.mark.parametrize("backend", [None, "cpu", "triton"])
@pytest.mark.parametrize("fn, make", [(qk.qadapter_loss, loss_args), (qk.residual_q_values, rqv_args)],
                         ids=["loss", "residual_q_values"])
def test_fused_backends_refuse_meta_tensors(fn, make, backend):
    """All tensors on one device that no fused kernel serves: a clear error naming the backend."""
    args = {k: torch.empty_like(v, device="meta") for k, v in make("cpu").items()}
    patterns = {None: r"no fused kernel for device meta; pass backend='torch'",
                "cpu": r"backend='cpu' needs CPU tensors, got tensors on meta",
                "triton": r"backend='triton' needs CUDA \(or CPU with the interpreter\), got meta"}
    with pytest.raises(ValueError, match=patterns[backend]):
        fn(**args, backend=backend)


@pytest.mark.parametrize("fn, make", [(qk.qadapter_loss, loss_args), (qk.residual_q_values, rqv_args)],
                         ids=["loss", "residual_q_values"])
def test_triton_on_cpu_needs_the_interpreter(fn, make, monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_INTERPRETED", False)
    with pytest.raises(ValueError, match=r"backend='triton' on CPU tensors needs the Triton interpreter"):
        fn(**make("cpu"), backend="triton")


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


@pytest.mark.parametrize("backend, device", FUSED)
def test_neg_inf_q_at_taken_action_is_allowed_in_residual_q_values(backend, device):
    """Unlike the loss, the vocabulary pass accepts a -inf Q at the picked action: q_taken is -inf,
    the value finite (a banned action picked on purpose, e.g. to score a sampled sequence)."""
    args = rqv_args(device)
    q = args["q_logits"].clone()
    q[1, 2, int(args["actions"][1, 2])] = float("-inf")
    values, q_taken = qk.residual_q_values(q, args["base_logits"], args["actions"], backend=backend)
    assert q_taken[1, 2].item() == float("-inf") and torch.isfinite(values).all()
