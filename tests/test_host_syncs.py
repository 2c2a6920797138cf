"""Host syncs on the hot paths: one per public op call, one per training
step's loss, one per decoded token.

A host sync is any read of a tensor's value into Python (``tolist``, ``item``, ``bool``, ``int``,
``float``): on CUDA each one waits for the device. The counter patches those methods and counts
the calls made from this package's own code (the model's forward, peft and transformers are not
this package's to change). On CPU the same calls are made, so the count holds for every device.
"""
import sys
from pathlib import Path

import pytest
import torch

import qadapter_kernels as qk
from helpers import ALL_BACKENDS, make_pair_batch, make_rows

PACKAGE_DIR = str(Path(qk.__file__).parent)
READS = ("tolist", "item", "__bool__", "__int__", "__float__")


class HostSyncs:
    """Context manager: ``count`` = tensor-value reads made by qadapter_kernels code inside it."""

    def __enter__(self):
        self.count = 0
        self._saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def read(tensor, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE_DIR):
                self.count += 1
            return original(tensor, *args, **kwargs)

        return read

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_one_sync_per_loss_call(backend, device):
    """qadapter_loss used to sync twice (the id range, then the value checks)."""
    batch = make_pair_batch(2, 6, 13, seed=1).to(device)
    q = batch.q_logits.clone().requires_grad_()
    with HostSyncs() as syncs:
        out = qk.qadapter_loss(q, batch.base_logits, batch.input_ids, batch.loss_mask, backend=backend)
    assert syncs.count == 1
    with HostSyncs() as syncs:
        out.loss.backward()
    assert syncs.count == 0


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_one_sync_per_fused_linear_loss_call(backend, device):
    gen = torch.Generator().manual_seed(2)
    ha, hb = (torch.randn(4, 5, 8, generator=gen).to(device) for _ in range(2))
    w = torch.randn(13, 8, generator=gen).to(device)
    ids = torch.randint(0, 13, (4, 5), generator=gen).to(device)
    mask = torch.ones(4, 5, dtype=torch.bool, device=device)
    with HostSyncs() as syncs:
        qk.fused_linear_qadapter_loss(ha.requires_grad_(), hb, w, ids, mask, backend=backend, tile_budget_mb=1)
    assert syncs.count == 1


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_one_sync_per_residual_q_values_call(backend, device):
    q, base, actions = make_rows(0, 13, lead=(3, 4), seed=3)
    with HostSyncs() as syncs:
        qk.residual_q_values(q.to(device), base.to(device), actions.to(device), backend=backend)
    assert syncs.count == 1


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalars", "per-row-tensors"])
def test_one_sync_per_sample_call(backend, device, per_row):
    gen = torch.Generator().manual_seed(4)
    q, base = (torch.randn(3, 13, generator=gen).to(device) for _ in range(2))
    top_p = torch.tensor([0.9, 1.0, 0.5], device=device) if per_row else 0.9
    with HostSyncs() as syncs:
        qk.combined_sample(q, base, top_p=top_p, top_k=5, generator=1, backend=backend)
    assert syncs.count == 1
    w = torch.randn(13, 6, generator=gen).to(device)
    h = torch.randn(3, 6, generator=gen).to(device)
    with HostSyncs() as syncs:
        qk.combined_sample_from_hidden(h, h.clone(), w, top_p=top_p, generator=1, backend=backend)
    assert syncs.count == 1


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qadapter_kernels.model import QAdapterConfig, QAdapterModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
    return QAdapterModel(LlamaForCausalLM(config), QAdapterConfig())


@pytest.mark.parametrize("adapters", [None, {"default": torch.tensor([1.0, 0.5])}], ids=["one", "composed"])
def test_one_sync_per_decoded_token(adapters):
    """generate validated the sampling parameters at the start and again inside the sampler for
    every token, then synced once more for "all finished?": now the parameters are checked once and
    each token costs one sync (a row the sampler could not draw from, and whether any row goes on).
    Composed adapters' weights are checked once, up front, too."""
    model = _tiny_model().eval()
    prompt = torch.tensor([[1, 5, 9, 4], [1, 7, 3, 8]])
    counts = {}
    for steps in (3, 9):
        with HostSyncs() as syncs:
            out = model.generate(prompt, max_new_tokens=steps, top_p=torch.tensor([0.9, 0.8]), top_k=20,
                                 generator=0, eos_token_id=[], adapters=adapters)
        assert out.shape[1] == prompt.shape[1] + steps
        counts[steps] = syncs.count
    assert counts[9] - counts[3] == 9 - 3, counts  # exactly one per token
    # plus a few up-front checks of the prompt and the parameters (and one of the composed weights)
    assert counts[3] <= 3 + 5 + (adapters is not None), counts


def test_one_sync_per_training_step():
    """The loss of a training step (forward and backward) reads the device once."""
    model = _tiny_model().train()
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 64, (4, 10), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, 4:] = True
    with HostSyncs() as syncs:
        out = model(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
        out.loss.backward()
    assert syncs.count == 1
