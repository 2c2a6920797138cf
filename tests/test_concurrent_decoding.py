"""Decoding in several threads at once: each thread gets the tokens of the same decode done alone.

One model holds adapters "a" and "b"; threads decode it greedily with each adapter, with the base
model alone and with the authors' two passes, while another thread decodes a second model. The
per-call forwards decoding uses (sliced LoRA routing, the few-row CPU product) must hold for their
own thread only: had one thread's routing reached another, that thread would decode with the wrong
adapter or fail.
"""
import sys
import threading

import pytest
import torch

from qadapter_kernels.model import QAdapterModel
from test_composition import save_random_adapter, tiny_base

PROMPT = torch.tensor([[5, 17, 33, 4]])  # one row: 2 rows per mixed forward, the few-row product's case
NEW_TOKENS = 40
ROUNDS = 3  # decodes per thread in the concurrent run
DECODES = {  # name: (which model, generate's keywords)
    "active adapter": (0, {}),
    "adapter a": (0, {"adapters": {"a": 1.0}}),
    "adapter b": (0, {"adapters": {"b": 1.0}}),
    "adapter b, two passes": (0, {"adapters": {"b": 1.0}, "two_pass": True}),
    "base alone": (0, {"adapter": False}),
    "second model": (1, {}),
}
# Decodes of different policies (the two passes sample adapter b's policy, the active adapter is a).
DISTINCT = ("adapter a", "adapter b", "base alone", "second model")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    save_random_adapter(root / "a", seed=1)
    save_random_adapter(root / "b", seed=2, target_modules=("q_proj", "v_proj", "o_proj"))
    save_random_adapter(root / "c", seed=3)
    shared = QAdapterModel.from_pretrained({"a": root / "a", "b": root / "b"}, base_model=tiny_base())
    second = QAdapterModel.from_pretrained(root / "c", base_model=tiny_base())
    return shared.eval(), second.eval()


def decode(models, name: str) -> list[int]:
    which, kwargs = DECODES[name]
    out = models[which].generate(PROMPT, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=[], **kwargs)
    return out[0, PROMPT.shape[1]:].tolist()


def test_threads_decoding_one_model_with_different_adapters_each_get_their_own_tokens(models):
    alone = {name: decode(models, name) for name in DECODES}
    assert len({tuple(alone[name]) for name in DISTINCT}) == len(DISTINCT)  # a mix-up would show
    start = threading.Barrier(len(DECODES))
    results: dict[str, list] = {name: [] for name in DECODES}

    def run(name: str) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[name].append(decode(models, name))
        except Exception as error:  # noqa: BLE001 - reported below, with the decode it broke
            results[name].append(error)

    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: every decode interleaves
    try:
        threads = [threading.Thread(target=run, args=(name,)) for name in DECODES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
    finally:
        sys.setswitchinterval(switch_interval)
    assert not any(thread.is_alive() for thread in threads)
    wrong = {name: got for name, got in results.items() if got != [alone[name]] * ROUNDS}
    assert not wrong, f"decodes that differ from the same decode alone: {sorted(wrong)}: {wrong}"
