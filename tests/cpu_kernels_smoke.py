"""Every CPU op of the installed package against the plain-PyTorch reference, on small inputs.

Needs only torch and qadapter_kernels, so it runs from an installed wheel in a fresh venv and
under an emulated older CPU (``qemu-x86_64 -cpu Haswell|Nehalem``), where it must finish in a few
minutes. It checks the build the process loaded, whichever ISA that is; the test suite runs it once
per ISA the CPU supports (tests/test_cpu_dispatch.py). Usage:

    python cpu_kernels_smoke.py [--expect DEFAULT|AVX2|AVX512] [--expect-package-under DIR]

Prints one line per op and, last, ``cpu kernels smoke: <ISA> N passed, 0 failed``; exits 1 on
any mismatch.
"""
import argparse
import sys
from pathlib import Path

import torch

import qadapter_kernels as qk
from qadapter_kernels import reference

VOCAB = 1031  # prime and above one tile of 1024: a remainder tile and a vector tail
FP32 = dict(rtol=1e-4, atol=1e-4)
BF16 = dict(rtol=2e-2, atol=2e-2)
# A softmax at |y| ~ 1e4 in fp32 is no better than ulp(1e4) ~ 1e-3 relative: the gradients there.
GRAD_AT_LARGE_LOGITS = dict(rtol=2e-3, atol=1e-4)


def _logits(rows: int, seq: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter and base logits with the hard cases in some rows: a base row masked at -inf and
    finfo.min (the policy of a constrained vocabulary) and adapter logits at +-1e4."""
    q = torch.randn(rows, seq, VOCAB, generator=generator) * 3
    base = torch.randn(rows, seq, VOCAB, generator=generator) * 3
    base[0, :, 100:400] = -float("inf")
    base[-1, :, 500:] = torch.finfo(torch.float32).min
    q[1 % rows, :, :7] = 1e4
    q[1 % rows, :, 7:14] = -1e4
    return q.to(dtype), base.to(dtype)


def check_residual_q_values(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    q, base = _logits(3, 5, dtype, generator)
    actions = torch.randint(0, VOCAB, (3, 5), generator=generator)
    values, q_taken = qk.residual_q_values(q, base, actions, alpha_tilde=1.3, alpha_0=0.4)
    ref_values, ref_q = reference.residual_q_values(q.double(), base.double(), actions, alpha_tilde=1.3, alpha_0=0.4)
    torch.testing.assert_close(values.double(), ref_values, **tol)
    torch.testing.assert_close(q_taken.double(), ref_q, **tol)


def _pairs(dtype: torch.dtype, generator: torch.Generator):
    pairs, seq = 2, 9
    q, base = _logits(2 * pairs, seq, dtype, generator)
    input_ids = torch.randint(0, VOCAB, (2 * pairs, seq), generator=generator)
    loss_mask = torch.zeros(2 * pairs, seq, dtype=torch.bool)
    loss_mask[:, 3:] = True
    loss_mask[1, 7:] = False  # a shorter chosen answer: right padding
    return q, base, input_ids, loss_mask


def check_qadapter_loss(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    q, base, input_ids, loss_mask = _pairs(dtype, generator)
    for variant in ("advantage", "bellman", "official"):
        leaf = q.clone().requires_grad_()
        out = qk.qadapter_loss(leaf, base, input_ids, loss_mask, variant=variant)
        out.loss.backward()
        ref_leaf = q.double().requires_grad_()
        ref = reference.qadapter_loss(ref_leaf, base.double(), input_ids, loss_mask, variant=variant).loss
        ref.backward()
        torch.testing.assert_close(out.loss.double(), ref.detach(), **tol)
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **max(tol, GRAD_AT_LARGE_LOGITS, key=_rtol))


def _rtol(tolerance: dict) -> float:
    return tolerance["rtol"]


def check_fused_linear_loss(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    rows, seq, hidden = 4, 6, 24
    weight = (torch.randn(VOCAB, hidden, generator=generator) / hidden**0.5).to(dtype)
    h_q = torch.randn(rows, seq, hidden, generator=generator).to(dtype)
    h_b = torch.randn(rows, seq, hidden, generator=generator).to(dtype)
    input_ids = torch.randint(0, VOCAB, (rows, seq), generator=generator)
    loss_mask = torch.zeros(rows, seq, dtype=torch.bool)
    loss_mask[:, 2:] = True
    leaf_h, leaf_w = h_q.clone().requires_grad_(), weight.clone().requires_grad_()
    out = qk.fused_linear_qadapter_loss(leaf_h, h_b, leaf_w, input_ids, loss_mask)
    out.loss.backward()
    ref_h, ref_w = h_q.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference.qadapter_loss(ref_h @ ref_w.T, (h_b.double() @ ref_w.T).detach(), input_ids, loss_mask).loss
    ref.backward()
    torch.testing.assert_close(out.loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(leaf_h.grad.double(), ref_h.grad, **tol)
    torch.testing.assert_close(leaf_w.grad.double(), ref_w.grad, **tol)


def check_combined_logits(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    q, base = (t[:, 0] for t in _logits(5, 1, dtype, generator))
    z = qk.combined_logits(q, base, alpha_tilde=0.8, alpha_0=0.5)
    ref = reference.combined_logits(q.double(), base.double(), alpha_tilde=0.8, alpha_0=0.5)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(z), finite), "combined_logits: -inf entries differ from the reference"
    torch.testing.assert_close(z.double()[finite], ref[finite], **tol)


def check_combined_sample(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    q, base = (t[:, 0] for t in _logits(6, 1, dtype, generator))
    ref_z = reference.combined_logits(q.double(), base.double())
    greedy = qk.combined_sample(q, base, temperature=0.0)
    assert torch.equal(greedy, ref_z.argmax(-1)), f"greedy {greedy.tolist()} != argmax {ref_z.argmax(-1).tolist()}"
    # Sampled tokens must lie in the support the reference filters leave (top-k 50, then top-p 0.9).
    support = torch.isfinite(reference.filtered_logits(ref_z.float(), temperature=0.7, top_k=50, top_p=0.9))
    for seed in range(8):
        drawn = qk.combined_sample(q, base, temperature=0.7, top_k=50, top_p=0.9, generator=seed)
        assert bool(support.gather(1, drawn[:, None]).all()), f"seed {seed}: a token outside the filtered support"


def check_from_hidden(dtype: torch.dtype, tol: dict, generator: torch.Generator) -> None:
    rows, hidden = 5, 24
    weight = (torch.randn(VOCAB, hidden, generator=generator) / hidden**0.5).to(dtype)
    h_q = torch.randn(rows, hidden, generator=generator).to(dtype)
    h_b = torch.randn(rows, hidden, generator=generator).to(dtype)
    q, base = h_q.double() @ weight.double().T, h_b.double() @ weight.double().T
    ref_z = reference.combined_logits(q, base)
    tokens = torch.randint(0, VOCAB, (rows,), generator=generator)
    log_probs = qk.combined_log_probs_from_hidden(h_q, h_b, weight, tokens)
    torch.testing.assert_close(log_probs.double(), torch.log_softmax(ref_z, -1).gather(1, tokens[:, None])[:, 0], **tol)
    greedy = qk.combined_sample_from_hidden(h_q, h_b, weight, temperature=0.0)
    top2 = ref_z.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-2  # a near-tie may round either way in bf16
    assert torch.equal(greedy[clear], ref_z.argmax(-1)[clear]), "from_hidden greedy differs from the reference argmax"


CHECKS = [check_residual_q_values, check_qadapter_loss, check_fused_linear_loss, check_combined_logits,
          check_combined_sample, check_from_hidden]


def run(expect: str | None, package_under: str | None) -> int:
    capability = qk.cpu_capability()
    print(f"qadapter_kernels {qk.__version__} from {Path(qk.__file__).parent}, CPU kernels {capability}, "
          f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    failures = []
    if expect and capability != expect:
        failures.append(f"loaded {capability}, expected {expect}")
    if package_under and Path(package_under).resolve() not in Path(qk.__file__).resolve().parents:
        failures.append(f"imported {qk.__file__}, expected a package under {package_under}")
    passed = 0
    for check in CHECKS:
        for dtype, tol in ((torch.float32, FP32), (torch.bfloat16, BF16)):
            name = f"{check.__name__[len('check_'):]} {str(dtype).removeprefix('torch.')}"
            try:
                check(dtype, tol, torch.Generator().manual_seed(0))
            except Exception as error:  # a kernel error is a failure of this op, not of the run
                failures.append(f"{name}: {str(error).splitlines()[0]}")
                print(f"FAIL {name}: {error}")
            else:
                passed += 1
                print(f"ok   {name}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(f"cpu kernels smoke: {capability} {passed} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", choices=["DEFAULT", "AVX2", "AVX512"], help="the ISA the build must have loaded")
    parser.add_argument("--expect-package-under", help="fail unless qadapter_kernels was imported from below this folder")
    args = parser.parse_args()
    sys.exit(run(args.expect, args.expect_package_under))
