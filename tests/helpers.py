"""Builders and comparison helpers shared by the test modules (the one place they live).

Everything random takes an explicit ``torch.Generator`` seed, so a failing case reruns exactly.
"""
from dataclasses import dataclass

import pytest
import torch

from qadapter_kernels import reference

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# The interpreter is switched on by conftest.py only on machines without CUDA.
no_interpreter_with_cuda = pytest.mark.skipif(
    CUDA, reason="with CUDA present the Triton kernels run natively, not in the interpreter"
)

# (backend, device) pairs that run a fused kernel. "triton" on CPU tensors is the interpreter.
FUSED = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp", marks=no_interpreter_with_cuda),
    pytest.param("triton", "cuda", id="triton-cuda", marks=[requires_cuda, pytest.mark.cuda]),
]
# The same plus the reference backend (for argument checks, which every backend must share).
ALL_BACKENDS = FUSED + [pytest.param("torch", "cpu", id="torch")]


def interpreted(backend: str | None, device: str) -> bool:
    """True when the Triton interpreter runs the kernels: keep shapes small."""
    return backend == "triton" and torch.device(device).type == "cpu"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, gen, dtype=torch.float32):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


# --------------------------------------------------------------------------- logits


def make_logits(
    shape,
    *,
    gen: torch.Generator,
    scale: float = 3.0,
    offset: float = 0.0,
    neg_inf_frac: float = 0.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 logits ``scale * N(0, 1)``; ``offset`` adds +-offset per row (random sign);
    ``neg_inf_frac`` of the entries become -inf (banned tokens), never at index ``keep[...]``
    (the taken action), so every row keeps at least one finite entry."""
    x = scale * _randn(shape, gen)
    if offset:
        sign = torch.randint(0, 2, shape[:-1], generator=gen).float() * 2 - 1
        x = x + offset * sign.unsqueeze(-1)
    if neg_inf_frac:
        banned = torch.rand(shape, generator=gen) < neg_inf_frac
        if keep is not None:
            banned.scatter_(-1, keep.long().unsqueeze(-1), False)
        x = x.masked_fill(banned, float("-inf"))
    return x


def make_rows(
    n: int,
    vocab: int,
    *,
    seed: int,
    lead: tuple[int, ...] | None = None,
    dtype=torch.float32,
    device="cpu",
    neg_inf: str | None = None,
    offset: float = 0.0,
):
    """(q_logits, base_logits, actions) for residual_q_values: ``[*lead, V]`` logits
    (``lead`` defaults to ``(n,)``), actions in [0, V). ``neg_inf`` in (None, "q", "base", "both",
    "base-any"): where -inf entries go; never at the taken action except for "base-any" (the base
    model may ban the token the adapter picks: pi~ is 0 there but Q[a] is finite)."""
    gen = generator(seed)
    lead = (n,) if lead is None else lead
    shape = (*lead, vocab)
    actions = torch.randint(0, vocab, lead, generator=gen)
    q = make_logits(shape, gen=gen, offset=offset, neg_inf_frac=0.15 if neg_inf in ("q", "both") else 0.0,
                    keep=actions)
    base = make_logits(shape, gen=gen, offset=offset,
                       neg_inf_frac=0.15 if neg_inf in ("base", "both", "base-any") else 0.0,
                       keep=None if neg_inf == "base-any" else actions)
    if neg_inf == "base-any":
        base.view(-1, vocab)[::2].scatter_(-1, actions.reshape(-1, 1)[::2], float("-inf"))
    return q.to(device=device, dtype=dtype), base.to(device=device, dtype=dtype), actions.to(device)


# --------------------------------------------------------------------------- preference batches


@dataclass
class PairBatch:
    """A batch of B preference pairs as 2B rows, chosen first (docs/DESIGN.md §2)."""

    q_logits: torch.Tensor  # [2B, T, V]
    base_logits: torch.Tensor  # [2B, T, V]
    input_ids: torch.Tensor  # [2B, T] int64
    loss_mask: torch.Tensor  # [2B, T] bool: False on prompt and padding
    prompt_lens: list[int]
    response_lens: list[int]

    @property
    def B(self) -> int:
        return self.q_logits.shape[0] // 2

    def to(self, device=None, dtype=None) -> "PairBatch":
        return PairBatch(
            self.q_logits.to(device=device, dtype=dtype),
            self.base_logits.to(device=device, dtype=dtype),
            self.input_ids.to(device),
            self.loss_mask.to(device),
            self.prompt_lens,
            self.response_lens,
        )


def make_pair_batch(
    B: int,
    T: int,
    V: int,
    *,
    seed: int,
    dtype=torch.float32,
    device="cpu",
    prompt_lens: list[int] | None = None,
    response_lens: list[int] | None = None,
    neg_inf: str | None = None,
    offset: float = 0.0,
    scale: float = 3.0,
    pad_id: int = 0,
) -> PairBatch:
    """Random pairs, right-padded to T. Each pair shares one prompt (loss_mask False), then
    a response (True), then padding (False, ``pad_id``). Unless given, lengths are random and
    differ between rows; row 0 always fills all T columns (no padding: its response runs to the
    last column) and its rejected partner is shorter. ``response_lens[i] == 0`` gives a row with
    an empty mask. ``neg_inf`` ("q", "base", "both") bans random tokens other than the ones taken."""
    gen = generator(seed)
    rows = 2 * B
    if prompt_lens is None:
        prompt = [int(torch.randint(1, max(2, T // 2), (), generator=gen)) for _ in range(B)]
        prompt_lens = prompt + prompt
    if response_lens is None:
        response_lens = [int(torch.randint(1, T - p + 1, (), generator=gen)) for p in prompt_lens]
        response_lens[0] = T - prompt_lens[0]
        if B > 0 and T - prompt_lens[B] > 1:
            response_lens[B] = min(response_lens[B], T - prompt_lens[B] - 1)
    assert len(prompt_lens) == rows and len(response_lens) == rows
    input_ids = torch.randint(0, V, (rows, T), generator=gen)
    loss_mask = torch.zeros(rows, T, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        assert p + r <= T
        loss_mask[i, p : p + r] = True
        input_ids[i, p + r :] = pad_id
    if B > 0:  # chosen and rejected share their prompt
        input_ids[B:, :] = torch.where(
            torch.arange(T) < torch.tensor(prompt_lens[B:]).unsqueeze(1), input_ids[:B], input_ids[B:]
        )
    actions = reference.next_token_actions(input_ids)
    shape = (rows, T, V)
    q = make_logits(shape, gen=gen, scale=scale, offset=offset,
                    neg_inf_frac=0.15 if neg_inf in ("q", "both") else 0.0, keep=actions)
    base = make_logits(shape, gen=gen, scale=scale, offset=offset,
                       neg_inf_frac=0.15 if neg_inf in ("base", "both") else 0.0, keep=actions)
    return PairBatch(q.to(device=device, dtype=dtype), base.to(device=device, dtype=dtype),
                     input_ids.to(device), loss_mask.to(device), list(prompt_lens), list(response_lens))


# --------------------------------------------------------------------------- comparisons

# Forward values are fp32 reductions in both the kernels and the reference (whatever the input
# dtype, since both read the same low-precision inputs), so they share one tolerance. Gradients
# come out in the input dtype: one rounding to bf16/fp16 on top.
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-8),
    torch.float64: dict(rtol=1e-10, atol=1e-13),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, what: str = ""):
    """torch.testing.assert_close in fp64 on the CPU, NaN never equal, with a label."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    # Compared in fp64 (callers check dtypes themselves): a bf16 result is judged against the
    # fp32 ground truth, not against a copy rounded the same way.
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol, atol=atol,
        equal_nan=False, msg=lambda m: f"{what}: {m}",
    )


def random_weights(shape, seed: int, zero_frac: float = 0.0) -> torch.Tensor:
    """Upstream gradient for a random linear combination; ``zero_frac`` of it exactly zero."""
    gen = generator(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    if zero_frac:
        w = w.masked_fill(torch.rand(shape, generator=gen) < zero_frac, 0.0)
    return w


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh leaf that requires grad (optionally cast). Without a cast it shares ``t``'s memory
    and keeps its strides (clone() would make a sliced view contiguous)."""
    x = t.detach()
    if dtype is not None and dtype != t.dtype:
        x = x.to(dtype)
    return x.requires_grad_(True)


LOSS_FIELDS = ("loss", "pref_loss", "reg_loss", "chosen_scores", "rejected_scores", "accuracy")
DIFF_FIELDS = ("loss", "pref_loss", "reg_loss", "chosen_scores", "rejected_scores")


def weighted_outputs(out, seed: int) -> torch.Tensor:
    """A random linear combination of every differentiable output of qadapter_loss."""
    total = 0
    for k, name in enumerate(DIFF_FIELDS):
        value = getattr(out, name)
        w = random_weights(value.shape, seed + k).to(value.dtype).to(value.device)
        total = total + (value * w).sum()
    return total


def run_loss(batch: PairBatch, fn, *, q_dtype=None, grad_seed: int | None = 0, **kwargs):
    """Runs a qadapter_loss-like ``fn`` on a fresh leaf copy of the batch's q_logits.
    Returns (outputs, q_logits.grad) with the gradient of ``weighted_outputs`` (or of the loss
    alone when ``grad_seed`` is None)."""
    q = leaf(batch.q_logits, q_dtype)
    base = batch.base_logits.to(q_dtype) if q_dtype else batch.base_logits
    out = fn(q, base, batch.input_ids, batch.loss_mask, **kwargs)
    target = out.loss if grad_seed is None else weighted_outputs(out, grad_seed)
    target.backward()
    return out, q.grad


def set_arg(name: str, make):
    """A bad-input case: replaces argument ``name`` of an args dict by ``make(args)``."""
    def mutate(args):
        args[name] = make(args)
    return mutate


def poke_arg(name: str, index, value):
    """A bad-input case: writes ``value`` into (a copy of) argument ``name`` at ``index``."""
    def mutate(args):
        t = args[name].clone()
        t[index] = value
        args[name] = t
    return mutate


# --------------------------------------------------------------------------- bad-input cases shared by the ops

# The dispatcher ops: C++ on CPU tensors, Triton (registered for the CUDA key) on CUDA.
OP_DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[requires_cuda, pytest.mark.cuda]),
]
BAD_B, BAD_T, BAD_V = 2, 6, 13  # the shapes every bad-input case of the logits ops starts from


def loss_args(device) -> dict:
    """A valid qk.qadapter_loss call (keywords), [2B, T, V] = [4, 6, 13]."""
    batch = make_pair_batch(BAD_B, BAD_T, BAD_V, seed=11).to(device)
    return dict(q_logits=batch.q_logits, base_logits=batch.base_logits, input_ids=batch.input_ids,
                loss_mask=batch.loss_mask)


def rqv_args(device) -> dict:
    """A valid qk.residual_q_values call (keywords), [3, 4, 13] logits."""
    q, base, actions = make_rows(0, BAD_V, lead=(3, 4), seed=12)
    return dict(q_logits=q.to(device), base_logits=base.to(device), actions=actions.to(device))


NONFINITE_LOGITS = r"q_logits or base_logits.*NaN or \+inf, or a row with no finite entry"


def on_meta(name):
    return set_arg(name, lambda a: torch.empty_like(a[name], device="meta"))


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
    "base_logits on another device": (on_meta("base_logits"), ValueError, r"base_logits is on meta but q_logits is on"),
    "NaN in q_logits": (poke_arg("q_logits", (1, 2, 3), float("nan")), ValueError, NONFINITE_LOGITS),
    "NaN in base_logits": (poke_arg("base_logits", (0, 0, 0), float("nan")), ValueError, NONFINITE_LOGITS),
    "+inf in q_logits": (poke_arg("q_logits", (2, 1, 5), float("inf")), ValueError, NONFINITE_LOGITS),
    "+inf in base_logits": (poke_arg("base_logits", (1, 3, 0), float("inf")), ValueError, NONFINITE_LOGITS),
    "row of -inf in q_logits": (poke_arg("q_logits", (1, 1), float("-inf")), ValueError, NONFINITE_LOGITS),
    "row of -inf in base_logits": (poke_arg("base_logits", (2, 0), float("-inf")), ValueError, NONFINITE_LOGITS),
    "alpha_tilde = 0": (set_arg("alpha_tilde", lambda a: 0.0), ValueError, r"alpha_tilde must be in \(0"),
    "alpha_tilde < 0": (set_arg("alpha_tilde", lambda a: -1.0), ValueError, r"alpha_tilde must be in \(0"),
    "alpha_tilde = inf": (set_arg("alpha_tilde", lambda a: float("inf")), ValueError, r"alpha_tilde must be in"),
    "alpha_tilde = nan": (set_arg("alpha_tilde", lambda a: float("nan")), ValueError, r"alpha_tilde must be in"),
    "alpha_tilde a string": (set_arg("alpha_tilde", lambda a: "1.0"), TypeError, r"alpha_tilde must be a real number"),
    "alpha_tilde a bool": (set_arg("alpha_tilde", lambda a: True), TypeError, r"alpha_tilde must be a real number"),
    "alpha_0 < 0": (set_arg("alpha_0", lambda a: -0.01), ValueError, r"alpha_0 must be in \[0"),
    "bad backend": (set_arg("backend", lambda a: "cuda"), ValueError, r"backend must be one of"),
}


def call_with_backend(fn, args, backend):
    args = dict(args)
    backend = args.pop("backend", backend)
    return fn(**args, backend=backend)

