"""The pair pass as the dispatcher op qadapter::pair_loss (and its backward): opcheck (schema, fake
kernels, autograd registration) and its outputs against the reference. The public losses run it
after the vocabulary pass (test_qadapter_loss.py, test_fused_linear.py)."""
import pytest
import torch

from qadapter_kernels import reference

from helpers import OP_DEVICES, assert_close, leaf, make_pair_batch, random_weights

OPS = torch.ops.qadapter


def pair_values(device, dtype=torch.float32, B=2, T=7, seed=0):
    batch = make_pair_batch(B, T, 11, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(2 * B, T, generator=gen).to(device, dtype)
    q_taken = torch.randn(2 * B, T, generator=gen).to(device, dtype)
    return values, q_taken, batch.loss_mask.to(device)


@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", ["bellman", "official", "advantage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_opcheck_pair_loss(device, dtype, variant, length_norm):
    values, q_taken, mask = pair_values(device, dtype)
    torch.library.opcheck(OPS.pair_loss, (leaf(values), leaf(q_taken), mask, 0.9, 0.2, variant, length_norm))
    torch.library.opcheck(OPS.pair_loss, (values, q_taken, mask, 1.0, 0.0, variant, length_norm))


@pytest.mark.parametrize("length_norm", ["response", "padded", "none"])
@pytest.mark.parametrize("variant", ["bellman", "official", "advantage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_opcheck_pair_loss_backward(device, dtype, variant, length_norm):
    values, q_taken, mask = pair_values(device, dtype)
    _, _, _, scores, _, rewards, num_scored = OPS.pair_loss(values, q_taken, mask, 0.9, 0.2, variant, length_norm)
    g = lambda *shape, seed: random_weights(shape, seed).to(device, dtype)  # noqa: E731
    args = (g(seed=1), g(seed=2), g(seed=3), g(4, seed=4), g(4, 7, seed=5), scores, rewards, num_scored, mask,
            0.9, 0.2, variant, length_norm)
    torch.library.opcheck(OPS.pair_loss_backward, args)


@pytest.mark.parametrize("variant", ["bellman", "official", "advantage"])
@pytest.mark.parametrize("device", OP_DEVICES)
def test_pair_loss_op_outputs(device, variant):
    """The op's extra outputs: rewards (0 where unscored) and num_scored, as the reference defines them."""
    values, q_taken, mask = pair_values(device, B=3, T=10, seed=5)
    loss, pref, reg, scores, accuracy, rewards, num_scored = OPS.pair_loss(
        values, q_taken, mask, 0.9, 0.2, variant, "padded")
    ref = reference.pair_loss(values, q_taken, mask, gamma=0.9, beta=0.2, variant=variant, length_norm="padded")
    tol = dict(rtol=1e-5, atol=1e-6)
    assert_close(rewards, reference.rewards(values, q_taken, mask, 0.9, variant), **tol, what="rewards")
    assert num_scored.item() == reference.scored_positions(mask, variant).sum().item()
    assert_close(scores, torch.cat([ref.chosen_scores, ref.rejected_scores]), **tol, what="scores")
    for name, got in (("loss", loss), ("pref_loss", pref), ("reg_loss", reg), ("accuracy", accuracy)):
        assert_close(got, getattr(ref, name), **tol, what=name)

